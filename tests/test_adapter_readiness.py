"""Readiness covers the telephony adapters (issue 14 item 5): a gateway serving all three says
SERVING (the kubelet's readiness probe: grpc.health.v1, service "") only once every adapter listens,
has a status per adapter (vita.gateway.<protocol>), and its WebSocket ports answer a load balancer's
GET /healthz; all of it turns NOT_SERVING / 503 the moment the replica drains, while the gRPC port and
the adapters still finish running calls."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve.devcluster.processes import free_port
from vitaserve.gateway.adapters.readiness import HEALTH_PATH, health_name
from vitaserve.gateway.service import ADAPTERS


async def statuses(target: str) -> dict[str, str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        out = {}
        for name in ["", *(health_name(a) for a in ADAPTERS)]:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return out


def http_status(port: int, path: str = HEALTH_PATH) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_health_covers_every_adapter_and_drain_turns_it_all_off(cluster):
    ports = {name: free_port() for name in ADAPTERS}
    flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    gateway, servicer = cluster.run(cluster.start_gateway(cluster.decoder_target, "gw-ready", *flags))
    target = f"127.0.0.1:{gateway.port}"
    try:
        # by the time Gateway.start returned SERVING, every adapter accepts connections
        for name, port in ports.items():
            assert getattr(gateway, name).port == port
        before = cluster.run(statuses(target))
        http_before = {name: http_status(ports[name]) for name in ("twilio", "realtime")}
        cluster.run(gateway.runner.health.enter_graceful_shutdown())  # the first step of a drain ...
        servicer.draining = True  # ... and the servicer's (ConversationServicer.drain)
        after = cluster.run(statuses(target))
        http_after = {name: http_status(ports[name]) for name in ("twilio", "realtime")}
    finally:
        cluster.run(gateway.stop(0))
    assert before == {name: "SERVING" for name in before} and len(before) == 1 + len(ADAPTERS)
    assert after == {name: "NOT_SERVING" for name in after}
    assert http_before == {"twilio": 200, "realtime": 200} and http_after == {"twilio": 503, "realtime": 503}


def test_a_gateway_whose_adapter_cannot_listen_does_not_start(cluster):
    """A port already taken: Gateway.start fails (the pod never turns ready)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            cluster.run(cluster.start_gateway(cluster.decoder_target, "gw-taken", "--realtime-port", str(port)))
        except OSError as exc:
            assert "address already in use" in str(exc).lower() or exc.errno is not None
        else:
            raise AssertionError("a gateway started without its realtime port")
