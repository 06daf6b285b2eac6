"""The engine on its own thread: many callers submit, one loop batches them all.

Callers (the Triton adapter, tests) hand over a request with three callbacks: `on_token` for each
TokenEvent, `on_done(error)` exactly once at the end (None on success), and optional `is_cancelled`
polled every step (Triton's request.is_cancelled). Torch never runs on the callers' threads.

Callbacks run on a sender thread, not the engine thread: each step's events go into a bounded queue
(`send_queue` steps), so a slow response sender (Triton's, a client's) never holds up the next step
of every other call. The queue bounds memory: when the sender is that many steps behind, the engine
waits for it rather than piling up events.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from vitaserve.generator.engine import Engine, Request, TokenEvent
from vitaserve.generator.language_model import LanguageModel
from vitaserve.generator.scheduler import SchedulerConfig

log = structlog.get_logger(__name__)


class RequestCancelled(Exception):
    """The caller cancelled (barge-in, hang-up, client gone)."""


@dataclass
class _Callbacks:
    on_token: Callable[[TokenEvent], None]
    on_done: Callable[[Exception | None], None]
    is_cancelled: Callable[[], bool] | None
    closed: bool = False  # on_done was called (sender thread only)


def _done(cb: _Callbacks, rid: str, error: Exception | None) -> None:
    """Sender thread only: on_done once, whatever comes after."""
    if cb.closed:
        return
    cb.closed = True
    try:
        cb.on_done(error)
    except Exception:  # a broken caller must not stop the loop for everyone else
        log.exception("on_done callback failed", request_id=rid)


def _cancelled(cb: _Callbacks) -> bool:
    """A caller whose cancellation check itself fails is treated as gone."""
    try:
        return cb.is_cancelled is not None and bool(cb.is_cancelled())
    except Exception:
        log.exception("is_cancelled callback failed")
        return True


class EngineService:
    def __init__(self, lm: LanguageModel, name: str = "vita-engine", max_waiting: int = 0, send_queue: int = 256,
                 scheduler: SchedulerConfig | None = None):
        self.engine = Engine(lm, max_waiting, scheduler)
        # items: a list of (request id, callbacks, TokenEvent | ("done", error)) for one step; None ends
        self._outbox: queue.Queue = queue.Queue(maxsize=send_queue)
        self._sender = threading.Thread(target=self._send_loop, name=f"{name}-sender", daemon=True)
        self._sender.start()
        self._inbox: list[tuple[Request, _Callbacks]] = []
        self._cancels: set[str] = set()
        self._callbacks: dict[str, _Callbacks] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- caller side (any thread) ------------------------------------------------------------
    def submit(self, request: Request, on_token, on_done, is_cancelled=None) -> None:
        """Hand a request to the engine thread; engine.EngineFull at once when the requests not yet
        running (handed over, or waiting for a slot) are at the engine's limit: none waits unbounded."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self.engine.check_room(handed_over=len(self._inbox))
            self._inbox.append((request, _Callbacks(on_token, on_done, is_cancelled)))
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        with self._wake:
            self._cancels.add(request_id)
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish: every pending and running request ends with an error; the thread exits."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        self._sender.join(timeout)

    def load(self) -> dict:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting) + len(self._inbox),
                "free_slots": len(self.engine.free_slots)}

    # -- engine thread -----------------------------------------------------------------------
    def _finish(self, rid: str, error: Exception | None, batch: list | None = None) -> None:
        """The call is over for the engine: its on_done goes to the sender (in `batch`, or alone)."""
        cb = self._callbacks.pop(rid, None)
        if cb is None:
            return
        if batch is None:
            self._outbox.put([(rid, cb, _Done(error))])
        else:
            batch.append((rid, cb, _Done(error)))

    def _take_inbox(self) -> bool:
        with self._wake:
            while not (self._inbox or self._cancels or self._stopping or self.engine.has_work()):
                self._wake.wait()
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
            stopping = self._stopping
        done: list = []
        for request, cb in inbox:
            try:
                self.engine.add(request)
                self._callbacks[request.request_id] = cb
            except Exception as exc:  # ValueError for a bad request; anything else fails it alone too
                done.append((request.request_id, cb, _Done(exc)))
        for rid, cb in list(self._callbacks.items()):
            if rid in cancels or cb.closed or _cancelled(cb):
                self.engine.cancel(rid)
                self._finish(rid, RequestCancelled(f"request {rid} cancelled"), done)
        if done:
            self._outbox.put(done)
        return not stopping

    def _hand_over(self, events) -> None:
        """Queue one step's events for the sender. A method of its own so that no callback (and no
        Triton request or response sender it holds) outlives the step in a local of the loop:
        Triton does not unload a model while any request object is still referenced."""
        batch: list = []
        for rid, event in events:
            cb = self._callbacks.get(rid)
            if cb is None:
                continue
            if isinstance(event, Exception):  # this call failed alone; the engine already dropped it
                log.warning("request failed", request_id=rid, error=repr(event))
                self._finish(rid, event, batch)
                continue
            batch.append((rid, cb, event))
            if event.finished:
                self._finish(rid, None, batch)
        if batch:
            self._outbox.put(batch)  # blocks only when the sender is a whole queue of steps behind

    def _loop(self) -> None:
        """Never dies: whatever one iteration raises fails the calls it concerns, and the loop goes
        on serving the others and every later call."""
        try:
            while True:
                try:
                    if not self._take_inbox():
                        break
                    if not self.engine.has_work():
                        continue
                    events = self.engine.step()
                except Exception as exc:  # a bug outside one row: fail every running call clearly
                    log.exception("engine step failed")
                    for rid in list(self._callbacks):
                        self.engine.cancel(rid)
                        self._finish(rid, exc)
                    continue
                self._hand_over(events)
            for rid in list(self._callbacks):
                self.engine.cancel(rid)
                self._finish(rid, RuntimeError("the engine stopped"))
        finally:
            self._outbox.put(None)

    # -- sender thread -----------------------------------------------------------------------
    def _send_loop(self) -> None:
        while (batch := self._outbox.get()) is not None:
            self._send(batch)
            batch = None  # drop the step's callbacks before waiting for the next one

    def _send(self, batch) -> None:
        for rid, cb, item in batch:
            if isinstance(item, _Done):
                _done(cb, rid, item.error)
                continue
            if cb.closed:  # its on_token failed earlier: the engine drops it at its next step
                continue
            try:
                cb.on_token(item)
            except Exception as exc:
                _done(cb, rid, exc)
                self.cancel(rid)


@dataclass(frozen=True)
class _Done:
    error: Exception | None
