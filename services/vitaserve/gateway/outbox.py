"""Messages that background work puts and a stream handler yields, in order, with backpressure.

A Converse call answers while it reads the caller, and an answer decodes while it generates, so the
messages of a stream are made in tasks other than the handler's. They meet here: the queue is
bounded, so a caller that reads slowly holds the answer back (no unbounded buffer of audio), and
`drain` ends when the work ends, so no end-of-stream sentinel travels through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Generic, TypeVar

from vitaserve.common import metrics

T = TypeVar("T")

# ~1-2 s of answer audio at the decoder's block sizes, plus text deltas; with audio pieces of at most
# 64 KiB (gateway.answer.MAX_AUDIO_CHUNK_BYTES) a call holds at most 4 MiB for a reader that stalls
MAX_MESSAGES = 64


class Outbox(Generic[T]):
    def __init__(self, maxsize: int = MAX_MESSAGES):
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self._unread = False  # nobody drains any more: puts return at once, so the work can wind down

    @property
    def size(self) -> int:
        return self._queue.qsize()

    async def put(self, message: T) -> None:
        """Waits while the outbox is full: the reader is behind."""
        if not self._unread:
            await self._queue.put(message)
            metrics.GATEWAY_OUTBOX_MESSAGES.inc()
            if self._unread:  # the reader went away while this put waited
                self._stop_reading()

    def _taken(self, message: T) -> T:
        metrics.GATEWAY_OUTBOX_MESSAGES.dec()
        return message

    def _stop_reading(self) -> None:
        """The reader went away: drop what waits (which wakes blocked puts) and take no more."""
        self._unread = True
        while not self._queue.empty():
            self._taken(self._queue.get_nowait())

    async def drain(self, work: Coroutine[Any, Any, Any]) -> AsyncIterator[T]:
        """Run `work` as a task and yield what it puts, in order, until it ends; then raise its error,
        if any. Closing the iteration early (the caller went away) cancels the work and waits for it."""
        task = asyncio.ensure_future(work)
        getting: asyncio.Future | None = None
        try:
            while not task.done():
                if not self._queue.empty():
                    yield self._taken(self._queue.get_nowait())
                    continue
                getting = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({getting, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():  # the work ended first: what it put last is taken below
                    getting.cancel()   # a cancelled get() leaves the queue as it was
                    await asyncio.gather(getting, return_exceptions=True)
                    getting = None
                    continue
                message, getting = self._taken(getting.result()), None
                yield message
            while not self._queue.empty():  # what the work put just before it ended
                yield self._taken(self._queue.get_nowait())
            task.result()
        finally:
            for pending in (getting, task):
                if pending is not None and not pending.done():
                    pending.cancel()
            if not task.done():  # its cancellation may still put a message (Interrupted): never block it
                self._stop_reading()
            await asyncio.gather(*(p for p in (getting, task) if p is not None), return_exceptions=True)
            if getting is not None and not getting.cancelled():  # taken, never yielded (the reader left)
                self._taken(getting.result())
