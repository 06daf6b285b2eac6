"""MicroBatcher: a failing input fails alone; stopping fails waiting requests instead of hanging them."""

from __future__ import annotations

import asyncio
import threading

from vitaserve.common.batcher import BatcherStopped, MicroBatcher


def test_batcher_gives_an_error_only_to_the_input_that_caused_it():
    def square_all(xs):
        if any(x < 0 for x in xs):
            raise ValueError("negative input")
        return [x * x for x in xs]

    async def main():
        batcher = MicroBatcher(square_all, max_batch=4, max_wait_ms=50)
        batcher.start()
        try:
            return await asyncio.gather(*[batcher.submit_with_info(x) for x in (1, -2, 3, 4)], return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert [r[0] for r in (results[0], results[2], results[3])] == [1, 9, 16]
    assert isinstance(results[1], ValueError) and "negative" in str(results[1])


def test_stopping_the_batcher_fails_running_and_queued_requests():
    entered, release = threading.Event(), threading.Event()

    def slow(xs):
        entered.set()
        release.wait(10)
        return xs

    async def main():
        batcher = MicroBatcher(slow, max_batch=1, max_wait_ms=0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)  # its forward has begun
        queued = asyncio.ensure_future(batcher.submit(2))
        await batcher.stop()
        release.set()
        late = batcher.submit(3)
        return await asyncio.gather(running, queued, late, return_exceptions=True)

    assert all(isinstance(r, BatcherStopped) for r in asyncio.run(main()))


async def _batches_after_a_held_forward(max_batch: int, queued: list[tuple[tuple, float]]) -> list[list]:
    """Hold the first forward (one ("z", 0) request) while `queued` (value, deadline_s) arrive, then
    release it: the batches show the order the batcher chose. Keys are the values' first items."""
    entered, release = threading.Event(), threading.Event()
    batches = []

    def record(xs):
        batches.append(list(xs))
        if len(batches) == 1:
            entered.set()
            release.wait(10)
        return xs

    batcher = MicroBatcher(record, max_batch=max_batch, max_wait_ms=0, key=lambda x: x[0])
    batcher.start()
    held = asyncio.ensure_future(batcher.submit(("z", 0)))
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
    futures = [asyncio.ensure_future(batcher.submit_with_info(v, deadline_s=d)) for v, d in queued]
    await asyncio.sleep(0.05)
    assert batcher.waiting == len(queued)
    release.set()
    try:
        results = await asyncio.gather(held, *futures)
    finally:
        await batcher.stop()
    assert [results[0]] + [out for out, _ in results[1:]] == [("z", 0)] + [v for v, _ in queued]
    return batches


def test_keyed_batches_hold_one_key_oldest_first_and_others_keep_their_places():
    queued = [("b", 1), ("a", 2), ("b", 3), ("a", 4), ("a", 5), ("a", 6), ("c", 7)]
    batches = asyncio.run(_batches_after_a_held_forward(3, [(v, 0.0) for v in queued]))
    # after the held batch: the oldest ("b", 1) with its key, then "a" capped at max_batch, then the rest
    assert batches == [[("z", 0)], [("b", 1), ("b", 3)], [("a", 2), ("a", 4), ("a", 5)], [("a", 6)], [("c", 7)]]


def test_cancelled_callers_are_skipped_and_a_failing_key_fails_only_its_caller():
    seen = []

    def echo(xs):
        seen.extend(xs)
        return xs

    def key(x):
        if x == "bad":
            raise ValueError("no key for this input")
        return len(x)

    async def main():
        batcher = MicroBatcher(echo, max_batch=8, max_wait_ms=30, key=key)
        batcher.start()
        try:
            gone = asyncio.ensure_future(batcher.submit("xx"))
            kept = asyncio.ensure_future(batcher.submit("yy"))
            await asyncio.sleep(0)
            gone.cancel()
            results = await asyncio.gather(kept, batcher.submit("bad"), return_exceptions=True)
        finally:
            await batcher.stop()
        return results

    kept, bad = asyncio.run(main())
    assert kept == "yy" and seen == ["yy"]
    assert isinstance(bad, ValueError) and "no key" in str(bad)


def test_the_request_due_soonest_goes_first_with_its_key_in_due_order():
    # (value, seconds until needed): a later block with audio still buffered, a first block, ...
    queued = [(("a", 1), 5.0), (("b", 2), 0.0), (("c", 3), 1.0), (("a", 4), 0.5)]
    batches = asyncio.run(_batches_after_a_held_forward(4, queued))
    assert batches == [[("z", 0)], [("b", 2)], [("a", 4), ("a", 1)], [("c", 3)]]


def test_every_forward_runs_on_the_batchers_one_thread_while_other_work_uses_the_shared_executor():
    """Each thread calling torch keeps its own allocator arena and OpenMP pool: forwards spread over
    asyncio's executor grew the decoder's memory in steps (issue 12's soak). With busy default-executor
    threads around it (the decoder serialises states there), the model still sees one thread."""
    seen: set[int] = set()

    def record(xs):
        seen.add(threading.get_ident())
        return list(xs)

    async def main():
        batcher = MicroBatcher(record, max_batch=2, max_wait_ms=0, key=lambda x: x % 3)
        batcher.start()
        try:
            for _ in range(5):
                busy = [asyncio.to_thread(threading.Event().wait, 0.05) for _ in range(4)]
                await asyncio.gather(*busy, *[batcher.submit(x) for x in range(12)])
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert len(seen) == 1 and threading.get_ident() not in seen
