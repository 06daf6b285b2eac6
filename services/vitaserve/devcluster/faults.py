"""The fault matrix: what a caller sees when a component of the local cluster is killed, hung or
restarted at the start of a turn or mid-answer, and whether the call goes on afterwards.

One cell = (component, fault, moment). Its run, on a LocalCluster started by the same thread:
  1. a push-to-talk call (the project's ScriptedPhone) makes a warm-up turn that must complete;
  2. the caller speaks the faulted turn; the fault is injected right after its END_OF_UTTERANCE
     ("turn_start") or when the turn's first audio chunk arrives ("mid_answer"):
       killed    -> cluster.kill     (SIGKILL of the process group)
       hung      -> cluster.pause    (SIGSTOP of the process group)
       restarted -> cluster.terminate (SIGTERM: the component drains and exits as a pod told to stop)
  3. time to status = from the injection to the first of: the turn's Error (its code), its
     TurnFinished ("OK": the turn was not hurt), the end of the call (the call's gRPC status);
  4. recovery: resume the hung component, start the killed/terminated one again on its address;
  5. the call's next turn must complete: on the same call if it is still open, otherwise on a call
     resumed with the same session_id (the gateway died, or the call ended);
  6. Redis history is consistent: turn numbers increasing without duplicates, every turn the
     caller saw finish stored and not interrupted, only the faulted turn absent or interrupted.

Expected per cell (EXPECTED below, asserted by `CellResult.problems`): the code, and a bound on the
time to status. Killed: 2 s (the issue's bound; a dead peer's socket closes at once). Hung: the
hop's deadline + 1 s, the deadline read from the code that sets it (see `hop_deadlines`). A
component that is not on the path of the turn at that moment (the encoder mid-answer) leaves the
turn "OK"; a terminated component drains, so work it had already taken may complete ("OK").

The CLI (`vita-audio faults`) and tests/test_fault_matrix.py both run cells through FaultRunner.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from dataclasses import dataclass, field
from itertools import product

import grpc
import numpy as np

from vitaserve.common.channel_options import CALLER_KEEPALIVE_MS

COMPONENTS = ("encoder", "decoder", "triton", "gateway", "redis")
FAULTS = ("killed", "hung", "restarted")
MOMENTS = ("turn_start", "mid_answer")

KILLED_S = 2.0  # the bound for a killed component
SLACK_S = 1.0   # the allowance over a hop's deadline when a component hangs
TURN_LIMIT_S = 90.0  # a turn that is expected to complete gets this long (tiny models, 2 shared cores)
OK = "OK"
# A component back on its address is found by the gateway's channel at its next reconnect attempt:
# gRPC backs off up to max_reconnect_backoff_ms (1 s in gateway/backends.channel) with +-20 % jitter.
# Recovery includes that window; a turn inside it still fails UNAVAILABLE, since the clients' own
# retries (0.15-0.35 s of waits) are shorter than the backoff (reported in issue 12's notes).
RECONNECT_S = 1.0 * 1.2



def hop_deadlines() -> dict[str, float]:
    """How long each component may stay silent before the caller must have a status, read from the
    settings that bound it (so a changed default changes the expectation, not a copy of it)."""
    from vitaserve.common import keys
    from vitaserve.common.session_store import connect_redis
    from vitaserve.gateway import backends
    from vitaserve.gateway.settings import GatewaySettings

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    def budget(client) -> float:
        """A hung replica costs one attempt's timeout, or the whole retry budget where
        DEADLINE_EXCEEDED is retried (total time timeout_s * attempts, resp. * 2 for the decoder)."""
        timeout = default(client, "timeout_s")
        if grpc.StatusCode.DEADLINE_EXCEEDED not in backends.RETRYABLE:
            return timeout
        return timeout * (default(client, "attempts") if client is backends.EncoderClient else 2)

    return {
        "encoder": budget(backends.EncoderClient),
        "decoder": budget(backends.DecoderClient),
        "triton": GatewaySettings.token_gap_s,  # the generator stream's token gap (--token-gap-s)
        "gateway": sum(CALLER_KEEPALIVE_MS) / 1000,
        # one store call: a socket timeout per attempt, attempts stopped after RETRY_MAX_S; the turn
        # may make two in a row (the failing call, then giving the turn's number back)
        "redis": 2 * (default(connect_redis, "timeout_s") + keys.RETRY_MAX_S),
    }


@dataclass(frozen=True)
class Cell:
    component: str
    fault: str
    moment: str

    @property
    def name(self) -> str:
        return f"{self.component}/{self.fault}/{self.moment}"


@dataclass(frozen=True)
class Expected:
    codes: frozenset[str]  # acceptable outcomes: a gRPC status name, or OK
    within_s: float        # bound on the time to a non-OK status
    why: str = ""


def expected(cell: Cell, deadlines: dict[str, float] | None = None) -> Expected:
    """The expectation of one cell (see the module docstring)."""
    deadlines = deadlines or hop_deadlines()
    c, f, m = cell.component, cell.fault, cell.moment
    if c == "encoder" and m == "mid_answer":
        return Expected(frozenset({OK}), TURN_LIMIT_S, "the encoder's work for the turn is done")
    # The generator may have finished the turn's tokens before the first audio reaches the caller
    # (the tiny LM makes 150 tokens in ~0.5 s on CPU, the decoder's first block takes ~1 s): then
    # the turn is not hurt (OK); when it is still streaming, the bound below applies.
    done_early = frozenset({OK}) if c == "triton" and m == "mid_answer" else frozenset()
    if f == "hung":
        code = "UNAVAILABLE" if c in ("gateway", "redis") else "DEADLINE_EXCEEDED"
        return Expected(frozenset({code}) | done_early, deadlines[c] + SLACK_S,
                        f"{c}'s deadline {deadlines[c]:g} s + 1 s")
    if f == "killed":
        return Expected(frozenset({"UNAVAILABLE"}) | done_early, KILLED_S, "a dead peer's connection closes at once")
    # restarted: SIGTERM, the component drains what it holds and refuses the rest
    if c == "gateway":
        from vitaserve.devcluster.cluster import LocalCluster
        grace = inspect.signature(LocalCluster).parameters["grace_s"].default
        return Expected(frozenset({OK, "UNAVAILABLE"}), grace + SLACK_S, "the gateway drains running calls")
    return Expected(frozenset({OK, "UNAVAILABLE"}), KILLED_S, f"{c} finishes what it holds, refuses the rest")


def all_cells() -> list[Cell]:
    return [Cell(c, f, m) for c, f, m in product(COMPONENTS, FAULTS, MOMENTS)]


def suite_cells() -> list[Cell]:
    """What the test suite runs: one mid-answer kill per component."""
    return [Cell(c, "killed", "mid_answer") for c in COMPONENTS]


@dataclass
class CellResult:
    cell: Cell
    expected: Expected
    outcome: str = ""            # OK, a status name, or NO_STATUS (nothing within the wait)
    time_to_status_s: float | None = None
    faulted_turn: int = 0
    injected: bool = False
    next_turn_ok: bool = False
    history_ok: bool = False
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why this cell failed; empty when it passed."""
        out = []
        if self.outcome not in self.expected.codes:
            out.append(f"outcome {self.outcome or 'none'}, expected {' or '.join(sorted(self.expected.codes))}")
        elif self.outcome != OK and (self.time_to_status_s is None or self.time_to_status_s > self.expected.within_s):
            out.append(f"status after {self.time_to_status_s:.2f} s, bound {self.expected.within_s:g} s")
        if not self.next_turn_ok:
            out.append("the next turn did not complete")
        if not self.history_ok:
            out.append("Redis history inconsistent")
        return out + [n for n in self.notes if n.startswith("!")]

    @property
    def passed(self) -> bool:
        return not self.problems()


def check_history(stored: list[tuple[int, bool]], finished: set[int], faulted: int,
                  may_lose_acknowledged: bool = False) -> list[str]:
    """Problems with a session's history: `stored` = (turn, interrupted) in stored order, `finished`
    = the turns whose TurnFinished the caller got, `faulted` = the turn the fault hit.

    may_lose_acknowledged: Redis was killed with -9. With appendfsync everysec Redis replies before
    its AOF write when a background fsync is still running (it postpones the write up to 2 s), so
    the last turns acknowledged before the kill may be gone after the restart (README "Durability").
    Then finished turns just before the fault may be missing, as a suffix of the finished turns:
    never one older than a turn that is stored."""
    numbers = [t for t, _ in stored]
    problems = []
    if numbers != sorted(set(numbers)):
        problems.append(f"turns not increasing or duplicated: {numbers}")
    lost = sorted(t for t in finished if t not in numbers)
    newest_kept = max((t for t in finished if t in numbers and t < faulted), default=0)
    forgiven = set(lost) if may_lose_acknowledged and all(newest_kept < t < faulted for t in lost) else set()
    for t in sorted(finished):
        if t not in numbers:
            if t not in forgiven:
                problems.append(f"turn {t} finished for the caller but is not stored")
        elif dict(stored)[t]:
            problems.append(f"turn {t} finished for the caller but is stored interrupted")
    extra = sorted(set(numbers) - finished - {faulted})
    if extra:
        problems.append(f"turns stored that the caller never saw finish: {extra}")
    gaps = sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers) - {faulted} - forgiven)
    if gaps:
        problems.append(f"turns missing: {gaps}")
    return problems


def question(seconds: float = 1.5, rate: int = 8000) -> np.ndarray:
    """A caller's utterance: two tones (the tiny models answer anything; the pipeline is real)."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


class FaultRunner:
    """Runs cells on a started LocalCluster. Call `run_cell` from the thread that started the cluster:
    it restarts components, whose parent-death signal follows the spawning thread. The calls run on
    an event loop in a thread of their own, so a blocking recovery never stalls the caller's clock."""

    def __init__(self, cluster, utterance: np.ndarray | None = None, max_new_tokens: int = 150,
                 log=lambda msg: None):
        self.cluster = cluster
        self.utterance = question() if utterance is None else utterance
        self.max_new_tokens = max_new_tokens
        self.log = log
        self.deadlines = hop_deadlines()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-calls", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self, coro, timeout_s: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def target(self) -> str:
        return self.cluster.service("gateway").address

    # ---- the caller ---------------------------------------------------------------------------
    async def _open(self, session_id: str = ""):
        from vitaserve.api import audio_pb2, conversation_pb2 as pb
        from vitaserve.client.scripted_phone import ScriptedPhone

        phone = ScriptedPhone(self.target)
        phone.task = asyncio.ensure_future(phone.run())
        await phone.outbox.put(pb.ConverseRequest(config=pb.CallConfig(
            input_format=audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_MULAW, sample_rate=8000),
            max_new_tokens=self.max_new_tokens, sampling=audio_pb2.SamplingOptions(greedy=True),
            push_to_talk=True, session_id=session_id)))
        return phone

    async def _say(self, phone) -> None:
        """A push-to-talk utterance: its 20 ms frames at once (the gateway allows audio up to 2 s
        ahead of real time), then END_OF_UTTERANCE."""
        from vitaserve.api import conversation_pb2 as pb

        for frame in phone.frames(self.utterance):
            await phone.outbox.put(pb.ConverseRequest(audio=pb.AudioFrame(data=frame)))
        await phone.control(pb.Control.END_OF_UTTERANCE)

    async def _status(self, phone, turn: int, limit_s: float) -> str:
        """Wait for the turn's TurnFinished (OK), an Error (its code) or the call's end (its status)."""
        import grpc

        waits = {asyncio.ensure_future(phone.event(f"turn_finished:{turn}").wait()): "finished",
                 asyncio.ensure_future(phone.event("error").wait()): "error"}
        try:
            done, _ = await asyncio.wait([*waits, phone.task], timeout=limit_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not done:
            return "NO_STATUS"
        if phone.event("error").is_set():
            return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == phone.of("error")[-1].code)).name
        if phone.event(f"turn_finished:{turn}").is_set():
            return OK
        code = phone.task.result()  # the call ended: its status
        return "CALL_ENDED_OK" if code == grpc.StatusCode.OK else code.name

    async def _turn(self, phone, turn: int) -> str:
        phone.event("error").clear()
        await self._say(phone)
        return await self._status(phone, turn, TURN_LIMIT_S)

    async def _hang_up(self, phone) -> None:
        from vitaserve.api import conversation_pb2 as pb

        if not phone.task.done():
            await phone.control(pb.Control.HANG_UP)
            await phone.outbox.put(None)
        try:
            await asyncio.wait_for(asyncio.shield(phone.task), 30)
        except asyncio.TimeoutError:
            phone.task.cancel()

    # ---- one cell -----------------------------------------------------------------------------
    async def _faulted_turn(self, cell: Cell, result: CellResult):
        """Warm-up turn, then the faulted turn; fills outcome and time to status."""
        phone = await self._open()
        if (warm := await self._turn(phone, 1)) != OK:
            raise RuntimeError(f"the warm-up turn before {cell.name} did not complete: {warm}")
        result.faulted_turn = 2
        phone.event("error").clear()
        phone.event("audio").clear()
        await self._say(phone)
        if cell.moment == "mid_answer":
            try:
                await asyncio.wait_for(phone.event("audio").wait(), TURN_LIMIT_S)
            except asyncio.TimeoutError:
                raise RuntimeError(f"{cell.name}: the faulted turn sent no audio") from None
            if phone.event("turn_finished:2").is_set():
                result.notes.append("! the answer ended before the fault: not mid-answer")
        t_fault = time.monotonic()
        result.injected = True
        injection = asyncio.ensure_future(self._inject(cell))  # a drain (SIGTERM) runs beside the wait
        result.outcome = await self._status(phone, 2, result.expected.within_s + 10)
        result.time_to_status_s = time.monotonic() - t_fault
        await injection
        return phone

    async def _inject(self, cell: Cell) -> None:
        name = cell.component
        if cell.fault == "killed":
            self.cluster.kill(name)
        elif cell.fault == "hung":
            self.cluster.pause(name)
        else:  # SIGTERM; the drain may take a while: off the caller's loop
            await asyncio.to_thread(self.cluster.terminate, name)

    def _recover(self, cell: Cell) -> None:
        """Bring the component back (in this thread: restarted processes must outlive it)."""
        if cell.fault == "hung":
            self.cluster.resume(cell.component)
            self.cluster.wait_ready(cell.component, 60)
        else:
            self.cluster.start_again(cell.component)
            time.sleep(RECONNECT_S)

    async def _after(self, phone, result: CellResult) -> None:
        """The next turn on the call (or a resumed one), then the history check."""
        from vitaserve.common.session_store import SessionStore, connect_redis

        session_id = phone.of("session_started")[0].session_id
        phones = [phone]
        if phone.task.done():  # the call ended: the caller dials back in with its session id
            result.notes.append(f"call ended ({phone.task.result().name}); resumed")
            phone = await self._open(session_id)
            phones.append(phone)
            try:
                await asyncio.wait_for(phone.event("session_started").wait(), 30)
            except asyncio.TimeoutError:
                pass
            if phone.task.done() and not phone.event("session_started").is_set():
                result.notes.append(f"! resume refused: {phone.task.result().name} {phone.error and phone.error.details()}")
                return
        outcome = await self._next_turn(phone)
        result.next_turn_ok = outcome == OK
        if not result.next_turn_ok:
            result.notes.append(f"next turn: {outcome} {phone.of('error')[-1].message if phone.of('error') else ''}")
        await self._hang_up(phone)
        finished = {m.turn for p in phones for m in p.of("turn_finished")}
        store = SessionStore(connect_redis(self.cluster.redis_url))
        try:
            record = await store.get(session_id)
        finally:
            await store.redis.aclose()
        if record is None:
            result.notes.append("! the session is gone from Redis")
            return
        stored = [(t.turn, t.interrupted) for t in record.history]
        may_lose = result.cell.component == "redis" and result.cell.fault == "killed"
        problems = check_history(stored, finished, result.faulted_turn, may_lose_acknowledged=may_lose)
        lost = sorted(t for t in finished if t not in {n for n, _ in stored})
        if may_lose and lost and not problems:
            result.notes.append(f"acknowledged turns {lost} lost with Redis's last AOF second (documented)")
        result.history_ok = not problems
        result.notes += [f"history {stored}: {p}" for p in problems]

    async def _next_turn(self, phone) -> str:
        """The turn after recovery. Its number depends on the fault (a failed turn gives its number
        back; one the caller partly heard is kept, as is one a dead gateway left open), so: OK when
        a new TurnFinished arrives, whatever its number; the history check judges the numbers."""
        seen = {m.turn for m in phone.of("turn_finished")}
        phone.event("error").clear()
        phone.event("turn_finished").clear()
        await self._say(phone)
        waits = [asyncio.ensure_future(phone.event(kind).wait()) for kind in ("turn_finished", "error")]
        try:
            await asyncio.wait([*waits, phone.task], timeout=TURN_LIMIT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if {m.turn for m in phone.of("turn_finished")} - seen:
            return OK
        if phone.event("error").is_set():
            return f"Error {phone.of('error')[-1].code}"
        return "call ended" if phone.task.done() else "NO_STATUS"

    def run_cell(self, cell: Cell) -> CellResult:
        """One cell; a cell that cannot run (its warm-up turn failed) is a failed result, and the
        component is brought back whatever happened, so the next cell starts on a whole cluster."""
        result = CellResult(cell, expected(cell, self.deadlines))
        self.log(f"{cell.name}: running")
        phone = None
        try:
            phone = self._run(self._faulted_turn(cell, result))
        except Exception as exc:
            result.notes.append(f"! {exc}")
        finally:
            if result.injected:
                self._recover(cell)
        if phone is not None:
            try:
                self._run(self._after(phone, result))
            except Exception as exc:
                result.notes.append(f"! after recovery: {exc!r}")
        took = "-" if result.time_to_status_s is None else f"{result.time_to_status_s:.2f} s"
        self.log(f"{cell.name}: {result.outcome} after {took}; "
                 f"{'pass' if result.passed else 'FAIL: ' + '; '.join(result.problems())}")
        return result


def table(results: list[CellResult]) -> str:
    """The matrix as text: one row per cell."""
    rows = [("component", "fault", "moment", "expected", "within", "outcome", "time", "next", "history", "result")]
    for r in results:
        rows.append((r.cell.component, r.cell.fault, r.cell.moment, "/".join(sorted(r.expected.codes)),
                     f"{r.expected.within_s:g} s", r.outcome,
                     "-" if r.time_to_status_s is None else f"{r.time_to_status_s:.2f} s",
                     "ok" if r.next_turn_ok else "FAIL", "ok" if r.history_ok else "FAIL",
                     "pass" if r.passed else "FAIL: " + "; ".join(r.problems())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) + "  " + row[-1] for row in rows)
