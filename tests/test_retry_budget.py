"""Item 5: retries of the encoder and decoder calls are bounded per backend by a retry budget (a token
bucket: a fraction of the calls plus a small floor), so an outage does not multiply the load on the
tier that fails; DEADLINE_EXCEEDED is not retried. Pure tests of the budget, then a real gRPC server
that answers RESOURCE_EXHAUSTED (or too late) and counts the attempts it sees."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from vitaserve.api import encoder_pb2_grpc
from vitaserve.common.grpc_server import ServiceRunner, make_server
from vitaserve.gateway.backends import EncoderClient, RetryBudget


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def spend(budget: RetryBudget, calls: int, retries_each: int) -> int:
    """`calls` calls, each asking for up to `retries_each` retries; the retries granted."""
    granted = 0
    for _ in range(calls):
        budget.on_call()
        for _ in range(retries_each):
            if not budget.try_retry():
                break
            granted += 1
    return granted


def test_an_outage_gets_a_fraction_of_the_calls_as_retries():
    """Every call fails and wants 3 retries: without a budget 300 retries for 100 calls; with one,
    at most burst + ratio x calls (no time passes), and the budget is really spent (not far below)."""
    budget = RetryBudget(ratio=0.2, floor_per_s=1.0, burst=10, clock=Clock())
    granted = spend(budget, 100, 3)
    # the first ~10 calls find the bucket full: their deposits are capped away, so up to 10 x 0.2 lost
    assert 10 + 0.2 * 100 - 2 - 1 <= granted <= 10 + 0.2 * 100


def test_the_floor_refills_with_time_and_the_burst_caps_what_is_saved():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, floor_per_s=1.0, burst=10, clock=clock)
    assert spend(budget, 0, 0) == 0 and [budget.try_retry() for _ in range(11)].count(True) == 10
    assert not budget.try_retry()
    clock.t += 3.0
    assert [budget.try_retry() for _ in range(5)].count(True) == 3  # 1 per second of floor
    clock.t += 3600.0
    assert [budget.try_retry() for _ in range(50)].count(True) == 10  # an hour saves at most the burst


def test_healthy_traffic_never_meets_the_budget():
    """5 % of the calls fail once (a replica restarting): every one of them is retried."""
    budget = RetryBudget(ratio=0.2, floor_per_s=0.0, burst=10, clock=Clock())
    granted = 0
    for i in range(2000):
        budget.on_call()
        if i % 20 == 0:
            granted += budget.try_retry()
    assert granted == 100


@pytest.mark.parametrize("kw", [{"ratio": -0.1}, {"ratio": 1.5}, {"floor_per_s": float("inf")}, {"burst": 0.5},
                                {"ratio": float("nan")}])
def test_a_bad_budget_is_refused(kw):
    with pytest.raises(ValueError, match="retry budget"):
        RetryBudget(**kw)


# ---- a real server --------------------------------------------------------------------------------
class Refusing(encoder_pb2_grpc.EncoderServicer):
    """An encoder replica that refuses (RESOURCE_EXHAUSTED) or answers too late; counts attempts."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED, delay_s: float = 0.0):
        self.code, self.delay_s, self.attempts = code, delay_s, 0

    async def Encode(self, request, context):
        self.attempts += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        await context.abort(self.code, "encoder full")


async def _serve(servicer) -> ServiceRunner:
    server = make_server()
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server)
    runner = ServiceRunner(server, ["vita.audio.v1.Encoder"], 0, host="127.0.0.1")
    await runner.start()
    return runner


SPEECH = np.zeros(1600, np.float32)


def test_retries_of_a_refusing_backend_stop_at_the_budget():
    """40 calls to a backend that answers RESOURCE_EXHAUSTED, 3 attempts each: 120 attempts without a
    budget; with ratio 0.2 and burst 5 (no floor, so the bound is exact) at most 40 + 5 + 8, and every
    call fails with the backend's own status."""
    async def main():
        servicer = Refusing()
        runner = await _serve(servicer)
        client = EncoderClient(f"127.0.0.1:{runner.port}", timeout_s=5.0, attempts=3,
                               budget=RetryBudget(ratio=0.2, floor_per_s=0.0, burst=5))
        codes = []
        try:
            for _ in range(40):
                try:
                    await client.encode(SPEECH)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
        finally:
            await client.close()
            await runner.stop()
        return servicer.attempts, codes

    attempts, codes = asyncio.run(main())
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert 40 + 5 <= attempts <= 40 + 5 + 0.2 * 40, attempts


def test_deadline_exceeded_is_not_retried():
    """A replica that answers after the hop's deadline: one attempt, DEADLINE_EXCEEDED at the deadline
    (retrying would make the turn wait the deadline again, and add to a slow replica's work)."""
    async def main():
        servicer = Refusing(delay_s=2.0)
        runner = await _serve(servicer)
        client = EncoderClient(f"127.0.0.1:{runner.port}", timeout_s=0.3, attempts=3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await client.encode(SPEECH)
            took = loop.time() - start
        finally:
            await client.close()
            await runner.stop()
        return servicer.attempts, failure.value.code(), took

    attempts, code, took = asyncio.run(main())
    assert (attempts, code) == (1, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert took < 0.3 + 1.0
