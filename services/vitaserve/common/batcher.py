"""Micro-batching for model calls: concurrent requests share one forward.

Requests wait at most `max_wait_ms` for company (or until `max_batch` are queued); the batch runs on
a worker thread so the event loop never runs torch. One batch at a time per model, always on the
same thread (the batcher's own): each thread that calls torch gets its own allocator arena (glibc and
jemalloc both) and its own OpenMP thread pool, so forwards spread over asyncio's shared executor
(6 threads on 2 cores) made the decoder's memory climb in steps for minutes of a soak, each time a
new executor thread met the largest shapes (issue 12).

With a `key` function only requests with equal keys share a forward (the decoder batches blocks of
equal shapes). Each request may say when its result is due (`deadline_s` from now; default 0, as
soon as possible): the waiting request due soonest goes next (earliest deadline first; with no
deadlines that is the oldest), with the waiting requests of its key in the same order; the others
keep waiting. A due time only comes closer, so no request starves.

If a batch raises, its requests are run again one by one, so only the request whose input caused
the error gets it and the others still get their results. `stop()` fails every request still
waiting, so no caller hangs on a stopped batcher.

The queue is bounded: a request that finds `max_queue` requests already waiting fails at once with
BatcherFull (the services answer RESOURCE_EXHAUSTED, and the gateway retries another replica)
instead of joining a wait that outlasts its caller's deadline.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class BatcherStopped(RuntimeError):
    """The batcher was stopped (server shutdown) before this request was computed."""


class BatcherFull(RuntimeError):
    """max_queue requests already wait: this one is refused at once (overload)."""


# Requests that may wait for a forward: a bound on memory and on waiting, not a tuned figure. 256 are
# 16 full forwards of the encoder's batch of 16 (8-80 ms each on the tests' 2-core CPU: well inside
# the gateway's 10 s deadline) and 32 of the decoder's batch of 8 (a 200-token block took 9 s there:
# far beyond its 30 s deadline, so on such hardware the deadline, not this bound, sheds load first).
MAX_QUEUE = 256


@dataclass(frozen=True)
class BatchInfo:
    """How one request was served: the forward it shared and how long it waited for it."""

    size: int  # requests in the forward that computed this one
    queue_ms: float  # from submit() to the start of that forward
    compute_ms: float  # that forward's time


@dataclass
class _Item(Generic[In, Out]):
    value: In
    future: asyncio.Future
    queued_at: float
    key: Hashable = None
    due: float = 0.0  # queued_at + deadline_s: the order requests are served in


def _order(item: _Item) -> tuple[float, float]:
    return item.due, item.queued_at


class MicroBatcher(Generic[In, Out]):
    def __init__(self, fn: Callable[[Sequence[In]], Sequence[Out]], max_batch: int = 16, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, float, list[float]], None] | None = None,
                 key: Callable[[In], Hashable] | None = None, max_queue: int = MAX_QUEUE):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch  # (batch size, compute ms, queue ms of each request)
        self.key = key  # requests share a forward only when their keys are equal (None: any may)
        self.max_queue = max_queue
        self._pending: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: list[_Item] = []
        self._thread: ThreadPoolExecutor | None = None  # the one thread that runs `fn`

    def start(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"batcher-{getattr(self.fn, '__name__', 'model')}")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        pending = self._running + list(self._pending)
        self._pending.clear()
        for item in pending:
            if not item.future.done():
                item.future.set_exception(BatcherStopped("the service is shutting down; retry on another replica"))
        self._running = []
        if self._thread is not None:
            self._thread.shutdown(wait=False)  # a forward in progress finishes; its result goes nowhere
            self._thread = None

    @property
    def waiting(self) -> int:
        """Requests queued for a forward (not yet computing)."""
        return len(self._pending)

    async def submit(self, value: In) -> Out:
        return (await self.submit_with_info(value))[0]

    async def submit_with_info(self, value: In, deadline_s: float = 0.0) -> tuple[Out, BatchInfo]:
        """The result and how it was computed; deadline_s: how soon it is needed (0: now)."""
        if self._task is None:
            raise BatcherStopped("the batcher is not running (call start() inside the event loop)")
        self._drop_cancelled()  # callers that went away hold no place
        if len(self._pending) >= self.max_queue:
            raise BatcherFull(f"{len(self._pending)} requests already wait for this replica's model: "
                              "retry on another replica")
        key = self.key(value) if self.key is not None else None  # a failing key fails this caller only
        future = asyncio.get_running_loop().create_future()
        now = time.perf_counter()
        self._pending.append(_Item(value, future, now, key, now + max(0.0, deadline_s)))
        self._arrived.set()
        return await future

    def _drop_cancelled(self) -> None:
        if any(i.future.cancelled() for i in self._pending):
            self._pending = deque(i for i in self._pending if not i.future.cancelled())

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _collect(self) -> list[_Item]:
        """The request due soonest and up to max_batch - 1 more of its key, after waiting for company."""
        while True:
            self._drop_cancelled()
            if self._pending:
                break
            await self._wait_for_arrival(None)
        deadline = time.perf_counter() + self.max_wait_s
        while True:
            self._drop_cancelled()
            if not self._pending:  # every waiting caller went away
                return []
            head = min(self._pending, key=_order)
            if sum(1 for i in self._pending if i.key == head.key) >= self.max_batch:
                break
            timeout = deadline - time.perf_counter()
            if timeout <= 0 or not await self._wait_for_arrival(timeout):
                break
        batch = sorted((i for i in self._pending if i.key == head.key), key=_order)[: self.max_batch]
        taken = {id(i) for i in batch}
        self._pending = deque(i for i in self._pending if id(i) not in taken)
        self._running = batch  # stop() fails them if cancelled while computing
        return batch

    async def _forward(self, items: list[_Item]) -> None:
        """Compute `items` in one call; on an error, each item alone (the error is one input's)."""
        start = time.perf_counter()
        try:
            values = [i.value for i in items]
            outs = await asyncio.get_running_loop().run_in_executor(self._thread, self.fn, values)
            if len(outs) != len(items):
                raise RuntimeError(f"batched function returned {len(outs)} results for {len(items)} inputs")
        except Exception as exc:
            if len(items) == 1:
                if not items[0].future.done():
                    items[0].future.set_exception(exc)
                return
            for item in items:
                await self._forward([item])
            return
        compute_ms = (time.perf_counter() - start) * 1000
        queue_ms = [(start - i.queued_at) * 1000 for i in items]
        if self.on_batch:
            self.on_batch(len(items), compute_ms, queue_ms)
        for item, out, q in zip(items, outs, queue_ms):
            if not item.future.done():
                item.future.set_result((out, BatchInfo(len(items), q, compute_ms)))

    async def _run(self) -> None:
        while True:
            items = await self._collect()
            if items:
                await self._forward(items)
            self._running = []
