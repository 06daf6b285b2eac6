"""Micro-batching for stateless model calls: concurrent requests share one forward.

Requests wait at most `max_wait_ms` for company (or until `max_batch` are queued); the batch runs on
a worker thread so the event loop never runs torch. One batch at a time per model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Item(Generic[In, Out]):
    value: In
    future: asyncio.Future
    queued_at: float


class MicroBatcher(Generic[In, Out]):
    def __init__(self, fn: Callable[[Sequence[In]], Sequence[Out]], max_batch: int = 16, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, float, list[float]], None] | None = None):
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch  # (batch size, compute ms, queue ms of each request)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, value: In) -> Out:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(value, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            deadline = time.perf_counter() + self.max_wait_s
            while len(items) < self.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            items = [i for i in items if not i.future.cancelled()]
            if not items:
                continue
            start = time.perf_counter()
            try:
                outs = await asyncio.to_thread(self.fn, [i.value for i in items])
            except Exception as exc:  # the whole batch failed: each caller gets the error
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            compute_ms = (time.perf_counter() - start) * 1000
            if self.on_batch:
                self.on_batch(len(items), compute_ms, [(start - i.queued_at) * 1000 for i in items])
            for item, out in zip(items, outs):
                if not item.future.done():
                    item.future.set_result(out)
