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
