"""A caller notices a frozen server through keepalive (issue 12, a hung gateway): a real server in a
process of its own is stopped with SIGSTOP (its kernel still acknowledges TCP, nothing answers) while
a client waits on a stream; common/channel_options.keepalive must end that stream UNAVAILABLE within
ping interval + ping timeout, plus slack for gRPC's timers and this process's scheduling.

The options under test are the ones every channel of ours uses, at short intervals; the server is a
plain grpcio server whose ping policy allows them (our servers allow pings every 10 s)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve.common.channel_options import CALLER_KEEPALIVE_MS, caller_options, keepalive
from vitaserve.devcluster.processes import free_port

SERVER = """
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2_grpc

async def main():
    server = grpc.aio.server(options=[("grpc.http2.min_ping_interval_without_data_ms", 100),
                                      ("grpc.keepalive_permit_without_calls", 1)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""

PING_MS, TIMEOUT_MS = 1000, 1000
SLACK_S = 2.0  # timer granularity and a loaded 2-core machine; far below gRPC's 60 s default


def test_a_stopped_server_ends_the_waiting_stream_within_ping_and_timeout():
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"

        async def watch() -> tuple[grpc.StatusCode, str, float]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=keepalive(PING_MS, TIMEOUT_MS)) as ch:
                stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
                first = await stream.read()  # SERVING: the stream is up, then only waits
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                os.kill(server.pid, signal.SIGSTOP)
                stopped = time.perf_counter()
                try:
                    await asyncio.wait_for(stream.read(), 30)
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details(), time.perf_counter() - stopped
                return grpc.StatusCode.OK, "the stream went on", time.perf_counter() - stopped

        code, details, took = asyncio.run(watch())
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert took <= (PING_MS + TIMEOUT_MS) / 1000 + SLACK_S, took
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait(10)


def test_every_keepalive_sets_the_pings_own_timeout():
    """grpc.keepalive_timeout_ms alone left an unanswered ping waiting 60 s (grpcio 1.85): the
    ping's timeout is set with it, and pings go on while a stream only waits."""
    from vitaserve.gateway.generator_client import triton_channel_args

    for options in (caller_options(), triton_channel_args(), keepalive(30_000, 10_000)):
        args = dict(options)
        assert args["grpc.http2.ping_timeout_ms"] == args["grpc.keepalive_timeout_ms"] > 0
        assert args["grpc.http2.max_pings_without_data"] == 0
    assert dict(caller_options())["grpc.keepalive_time_ms"] == CALLER_KEEPALIVE_MS[0]
