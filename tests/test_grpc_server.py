"""Item 5: a maximum connection age on our servers makes long-lived client channels reconnect, so
calls spread onto a replica that started after the channel connected, without failing a call in flight.

Two real servers (common/grpc_server.make_server) share one port with SO_REUSEPORT, as pods behind a
Service's virtual IP do: the kernel places each new connection on one of them. A gateway channel
(gateway/backends.channel, its production options) connected before the second replica existed
keeps all its calls on the first one unless the server ends the connection.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from vitaserve.common.grpc_server import ServiceRunner, make_server
from vitaserve.gateway.backends import RetryBudget, _retrying, channel

WHO = "/test.Replica/Who"


async def replica(name: str, port: int, age_s: float, grace_s: float) -> ServiceRunner:
    """A real server answering WHO with its name after sleeping the float32 seconds in the request."""
    async def who(request: bytes, context) -> bytes:
        await asyncio.sleep(float(request.decode() or 0))
        return name.encode()

    server = make_server(max_connection_age_s=age_s, max_connection_age_grace_s=grace_s)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Replica", {"Who": grpc.unary_unary_rpc_method_handler(who)}),))
    runner = ServiceRunner(server, ["test.Replica"], port, host="127.0.0.1")
    await runner.start()
    return runner


async def spread(age_s: float, watch_s: float) -> tuple[set[str], list, str]:
    """(replicas that answered short calls after B started, failures, the long call's answer)."""
    a = await replica("A", 0, age_s, grace_s=10.0)
    b = None
    client = channel(f"127.0.0.1:{a.port}")
    try:
        call = client.unary_unary(WHO)
        assert await call(b"0", timeout=5) == b"A"  # connected while A was alone
        b = await replica("B", a.port, age_s, grace_s=10.0)
        # a call in flight across several ages (its connection gets GOAWAY mid-call): it must finish
        long_call = asyncio.ensure_future(call(b"2.5", timeout=10))
        seen, failures = set(), []
        loop = asyncio.get_running_loop()
        end = loop.time() + watch_s
        budget = RetryBudget()

        async def short_call() -> bytes:
            """As the gateway's backend clients call: a call that meets the connection's GOAWAY as it
            starts fails UNAVAILABLE (their channels turn gRPC's own retries off) and is retried."""
            async for attempt in _retrying(3, 15.0, budget, "replica"):
                with attempt:
                    return await call(b"0.02", timeout=5)

        while loop.time() < end and seen != {"A", "B"}:
            results = await asyncio.gather(*(short_call() for _ in range(4)), return_exceptions=True)
            failures += [r for r in results if isinstance(r, BaseException)]
            seen |= {r.decode() for r in results if isinstance(r, bytes)}
            await asyncio.sleep(0.05)
        return seen, failures, (await long_call).decode()
    finally:
        await client.close()
        for runner in (a, b):
            if runner is not None:
                await runner.stop()


def test_without_an_age_a_channel_stays_on_its_first_replica():
    """The control: the reason for the setting (and what makes the next test able to fail)."""
    seen, failures, long_answer = asyncio.run(spread(age_s=0.0, watch_s=3.0))
    assert (seen, failures, long_answer) == ({"A"}, [], "A")


def test_an_aged_connection_reconnects_and_calls_reach_the_new_replica():
    """Age 0.5 s: every reconnect lands on B with probability 1/2 (the kernel hashes the new source
    port), so in 10 s (about 20 reconnects) B is missed with probability ~1e-6; no call fails at the
    caller (one that starts as its connection's GOAWAY arrives fails UNAVAILABLE and the backend
    clients' bounded retry takes it: seen in a loaded CI run), and the 2.5 s call in flight when its
    connection aged finishes within the 10 s grace."""
    seen, failures, long_answer = asyncio.run(spread(age_s=0.5, watch_s=10.0))
    assert failures == [] and seen == {"A", "B"} and long_answer == "A"


@pytest.mark.parametrize("age, grace", [(-1.0, 0.0), (1.0, float("nan"))])
def test_a_bad_age_is_refused(age, grace):
    with pytest.raises(ValueError, match="connection age"):
        make_server(max_connection_age_s=age, max_connection_age_grace_s=grace)
