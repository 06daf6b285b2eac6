"""Run an asyncio gRPC server the same way in every service: health, reflection, metrics, drain.

On SIGTERM/SIGINT the health status turns NOT_SERVING (load balancers and the gateway's clients stop
sending new calls), then running calls get `grace_s` to finish before the server stops.

The port serves TLS (common/tls.ServerTls: certificate reloaded from disk, mutual TLS with a client
CA) or, given no TLS, plaintext. A TLS service may also serve its health alone in plaintext on a
second port (`health_port`): the kubelet's gRPC probes speak no TLS, and health says nothing secret.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from vitaserve.common.channel_options import keepalive
from vitaserve.common.tls import ServerTls
from vitaserve.common.tracing import TraceInterceptor

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def make_server(max_message_bytes: int = MAX_MESSAGE_BYTES, max_connection_age_s: float = 0.0,
                max_connection_age_grace_s: float = 0.0) -> grpc.aio.Server:
    """A server with our message limits and keepalive, the trace of every RPC read before its handler
    (common/tracing.py), and an optional maximum connection age.

    max_connection_age_s (0: none): gRPC sends GOAWAY to a connection this old (+-10 % jitter), so
    a client's long-lived channel reconnects and re-resolves, and new replicas get their share of
    the calls (without it, a channel set up before a scale-up never reaches the new pods; behind an
    L4 balancer the new connection is balanced again). Calls in flight on the old connection go
    on for max_connection_age_grace_s, then are cut: the grace must outlast the longest call's
    deadline."""
    if not max_connection_age_s >= 0 or not max_connection_age_grace_s >= 0:  # also refuses NaN
        raise ValueError(f"connection age and grace must be >= 0 s, got {max_connection_age_s}, "
                         f"{max_connection_age_grace_s}")
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *keepalive(20_000, 10_000, without_calls=True),  # a frozen caller's connection ends too
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", max(1, round(max_connection_age_s * 1000))),
                    ("grpc.max_connection_age_grace_ms", round(max_connection_age_grace_s * 1000))]
    return grpc.aio.server(options=options, interceptors=[TraceInterceptor()])


class ServiceRunner:
    """Owns a server with health checking and reflection for the given service names, and the
    servicers' micro-batchers: started before the server takes calls, stopped after it ends them."""

    def __init__(self, server: grpc.aio.Server, service_names: list[str], port: int, host: str = "0.0.0.0",
                 batchers: Sequence = (), tls: ServerTls | None = None, health_port: int = 0,
                 health_names: Sequence[str] = ()):
        self.server = server
        self.batchers = list(batchers)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.service_names = service_names
        self.health_names = list(health_names)  # more statuses than the gRPC services (e.g. the gateway's adapters)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        if tls is None:
            self.port = server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = server.add_secure_port(f"{host}:{port}", tls.credentials())
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if health_port:
            self.health_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{host}:{health_port}")
        self._stop = asyncio.Event()

    async def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for name in ["", *self.service_names, *self.health_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float, on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """NOT_SERVING, then `on_drain` (the servicer refuses new calls and waits for running ones),
        then stop: one deadline of grace_s for all of it, not one per stage."""
        deadline = asyncio.get_running_loop().time() + grace_s
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING
        if on_drain is not None:
            await on_drain()
        await self.stop(max(0.0, deadline - asyncio.get_running_loop().time()))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop the server (running calls get grace_s), then the batchers (failing what still waits)."""
        await self.server.stop(grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for batcher in self.batchers:
            await batcher.stop()

    async def serve_until_signal(self, grace_s: float, on_drain=None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        log.info("draining", grace_s=grace_s)
        await self.drain(grace_s, on_drain)
        log.info("stopped")


def start_metrics(port: int) -> None:
    """Prometheus /metrics on its own port (0 = off)."""
    if port:
        start_http_server(port)
