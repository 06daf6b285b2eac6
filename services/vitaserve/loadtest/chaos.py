"""Chaos under load: while callers place calls, a monkey kills, hangs (SIGSTOP) or restarts a random
component of the local cluster, waits until it is back, and repeats.

What a caller does, as a telephony client would: a turn that fails (an Error message, or the stream
breaking) is counted by its code; when the stream broke it reconnects with its session id, retrying
for RECONNECT_S after the fault is over; then it tries its next turn. A call is LOST when it cannot
reconnect, or when that next turn fails outside every fault window: only turns in flight at a fault
may fail (issue 12). A turn is "at a fault" when its time span meets a fault's window, from the
injection to the component's recovery plus FAULT_GRACE_S.

Every fault waits for the previous one to recover and then `every_s` more, so that calls get quiet
time in which to show they recovered (faults back to back would leave no turn outside a window).
The monkey runs in the thread that started the cluster, the calls on an event loop in another (see
ChaosMonkey for why).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from vitaserve.client.phone import run_call
from vitaserve.loadtest.report import percentiles
from vitaserve.loadtest.runner import LoadConfig, LoadConfigError, watch_loop_lag

COMPONENTS = ("encoder", "decoder", "triton", "gateway", "redis")
FAULTS = ("kill", "stop", "restart")  # kill -9 then start again; SIGSTOP then SIGCONT; SIGTERM then start again
RECONNECT_S = 10.0  # issue 12: a call is lost when, reconnecting within 10 s, its next turn does not complete
# After a component is ready again its clients still have to reconnect: the gateway's channels to the
# encoder and decoder back off at most 1 s (gateway/backends.py), then a pick and a first request.
FAULT_GRACE_S = 2.0
CALL_ID_STRIDE = 100_000
RETRY_PAUSE_S = 0.5  # between reconnect attempts


def code_name(error: str) -> str:
    """'14: message' (an Error message's code and text, as phone.py records it) -> 'UNAVAILABLE'."""
    head = error.split(":")[0].strip()
    try:
        return next(c.name for c in grpc.StatusCode if c.value[0] == int(head))
    except (ValueError, StopIteration):
        return head or "UNKNOWN"


@dataclass(frozen=True)
class ChaosSettings:
    minutes: float
    every_s: float = 20.0  # quiet time between one fault's recovery and the next fault
    seed: int = 0
    components: tuple[str, ...] = COMPONENTS
    faults: tuple[str, ...] = FAULTS
    stop_s: float = 3.0  # how long a SIGSTOPped component stays stopped
    reconnect_s: float = RECONNECT_S
    grace_s: float = FAULT_GRACE_S
    recover_timeout_s: float = 240.0  # a component not back by then breaks the run (reported)

    def __post_init__(self):
        if self.minutes <= 0 or self.every_s <= 0 or self.stop_s <= 0:
            raise LoadConfigError("chaos minutes, fault interval and stop time must be positive")
        if not self.components or set(self.components) - set(COMPONENTS):
            raise LoadConfigError(f"chaos components must be some of {', '.join(COMPONENTS)}; "
                                  f"got {', '.join(self.components) or 'none'}")
        if not self.faults or set(self.faults) - set(FAULTS):
            raise LoadConfigError(f"chaos faults must be some of {', '.join(FAULTS)}; "
                                  f"got {', '.join(self.faults) or 'none'}")


@dataclass
class Fault:
    component: str
    fault: str
    at: float  # time.monotonic() of the injection
    recovered_at: float | None = None  # when the component was ready again
    error: str = ""  # why it did not recover


class ChaosMonkey:
    """Injects faults into a LocalCluster, one at a time, from the thread that calls `run`: the thread
    that started the cluster, since LocalCluster children get a parent-death signal when the thread
    that spawned them ends (devcluster/cluster.py), and a restarted service must outlive the run."""

    def __init__(self, cluster, settings: ChaosSettings, progress=lambda msg: None):
        self.cluster, self.settings, self.progress = cluster, settings, progress
        self.faults: list[Fault] = []
        self.broken = False  # a component did not come back: no more faults
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        """No more faults (the one in progress still recovers)."""
        self._stop.set()

    def run(self, until: float) -> None:
        """Fault after fault until `stop()` or time.monotonic() >= until."""
        rng = random.Random(self.settings.seed)
        while not self._stop.wait(self.settings.every_s) and time.monotonic() < until:
            fault = Fault(rng.choice(self.settings.components), rng.choice(self.settings.faults), time.monotonic())
            with self._lock:
                self.faults.append(fault)
            self.progress(f"chaos: {fault.fault} {fault.component}")
            try:
                self.inject(fault.component, fault.fault)
                fault.recovered_at = time.monotonic()
                self.progress(f"chaos: {fault.component} back after {fault.recovered_at - fault.at:.1f} s")
            except Exception as exc:  # the cluster could not bring it back: the run goes on, reported
                fault.error = f"{type(exc).__name__}: {exc}"[:2000]
                self.broken = True
                self.progress(f"chaos: {fault.component} did not recover: {fault.error.splitlines()[0]}")
                return

    def inject(self, component: str, fault: str) -> None:
        c, limit = self.cluster, self.settings.recover_timeout_s
        if fault == "kill":
            c.kill(component)
            c.start_again(component, limit)
        elif fault == "stop":
            c.pause(component)
            time.sleep(self.settings.stop_s)
            c.resume(component)
            c.wait_ready(component, limit)
        else:
            c.restart(component, graceful=True, timeout_s=limit)

    def active(self) -> bool:
        """A fault is in progress (its component not back yet), or one never recovered."""
        with self._lock:
            return any(f.recovered_at is None for f in self.faults)

    def last_recovered(self) -> float:
        with self._lock:
            return max((f.recovered_at for f in self.faults if f.recovered_at is not None), default=0.0)

    def overlaps(self, start: float, end: float) -> bool:
        """Does [start, end] meet a fault's window, injection to recovery + grace?"""
        with self._lock:
            return any(f.at <= end and start <= (f.recovered_at or float("inf")) + self.settings.grace_s
                       for f in self.faults)


@dataclass
class ChaosTally:
    turns: list[dict] = field(default_factory=list)  # every turn attempted: call, times, code, at a fault
    calls_started: int = 0
    calls_completed: int = 0
    calls_refused: Counter = field(default_factory=Counter)  # a new call that could not begin, by status
    calls_cut: int = 0  # still recovering when the run's hard limit came: counted as lost too
    lost: list[dict] = field(default_factory=list)
    reconnects: int = 0  # streams resumed with their session id after a failure
    hang_ups_failed: int = 0  # calls whose turns were done but whose HANG_UP never got through
    loop_lag_ms: dict = field(default_factory=dict)
    wall_s: float = 0.0


async def chaos_calls(cfg: LoadConfig, speech: list[np.ndarray], calls: int, chaos: ChaosSettings,
                      monkey: ChaosMonkey, on_turn=lambda: None) -> ChaosTally:
    """`calls` callers place call after call of `cfg.turns` turns for `chaos.minutes`, recovering
    from faults as described above. A call in progress at the end finishes (bounded)."""
    if not speech:
        raise LoadConfigError("no utterances to speak")
    tally = ChaosTally()
    rng = random.Random(cfg.seed)
    mode = cfg.modes[0]
    t0 = time.monotonic()
    until = t0 + chaos.minutes * 60

    def record(call: int, sid: str, start: float, end: float, code: str, resumed: bool) -> bool:
        at_fault = monkey.overlaps(start, end) if code else False
        tally.turns.append({"call": call, "session": sid[:8], "started_at_s": round(start - t0, 2),
                            "ended_at_s": round(end - t0, 2), "error": code, "at_fault": at_fault,
                            "after_reconnect": resumed})
        on_turn()
        return at_fault

    def lose(call: int, sid: str, reason: str) -> None:
        tally.lost.append({"call": call, "session": sid, "at_s": round(time.monotonic() - t0, 2), "reason": reason})

    async def one_call(i: int, k: int) -> None:
        call = i * CALL_ID_STRIDE + k
        sid, next_turn, remaining = "", 0, cfg.turns
        failed_at: float | None = None  # the failure this call has not yet shown it recovered from
        while True:
            if remaining == 0 and failed_at is None:
                tally.calls_completed += 1
                return await hang_up(sid)
            remaining = max(remaining, 1)  # after a failure the call must still complete a next turn
            picks = [speech[(i + k + next_turn + j) % len(speech)] for j in range(remaining)]
            began = time.monotonic()
            result = await run_call(cfg.target, picks, cfg.rate, cfg.codec, mode=mode, push_to_talk=cfg.push_to_talk,
                                    max_new_tokens=cfg.max_new_tokens, greedy=True,
                                    turn_timeout_s=cfg.turn_timeout_s, session_id=sid, hang_up=False)
            connected = bool(result.session_id)
            if connected:
                tally.calls_started += not sid  # a call exists once the server gave it a session
                sid = result.session_id
                tally.reconnects += result.resumed
            for t in result.turns:
                next_turn, remaining = next_turn + 1, remaining - 1
                code = code_name(t.error) if t.error else ""
                at_fault = record(call, sid, t.started_at, t.ended_at, code, result.resumed)
                if not code:
                    failed_at = None
                elif failed_at is not None and not at_fault:
                    return lose(call, sid, f"turn failed with {code} after the fault was over")
                else:
                    failed_at = failed_at or t.ended_at
            if result.status == "OK":
                continue
            now = time.monotonic()
            if connected and remaining > 0:  # the stream broke with a turn in flight: that turn failed
                start = result.turns[-1].ended_at if result.turns else began
                at_fault = record(call, sid, start, now, result.status, result.resumed)
                next_turn, remaining = next_turn + 1, remaining - 1
                if failed_at is not None and not at_fault:
                    return lose(call, sid, f"stream broke with {result.status} after the fault was over")
                failed_at = failed_at or now
            elif not connected and not sid:  # a new call refused at its start (e.g. the gateway is down)
                tally.calls_refused[result.status] += 1
                if now >= until:
                    return
            elif not connected:  # a reconnect attempt that did not get its session back
                failed_at = failed_at or now
                if not monkey.active() and now - max(failed_at, monkey.last_recovered()) > chaos.reconnect_s:
                    return lose(call, sid, f"could not resume within {chaos.reconnect_s:.0f} s: "
                                           f"{result.status} {result.details[:200]}")
            await asyncio.sleep(RETRY_PAUSE_S)

    async def hang_up(sid: str) -> None:
        """End a call whose turns are done: the turns ran without HANG_UP (a failed last turn must
        still be followed by a next one), so hang up on a resumed stream; best effort, bounded."""
        deadline = time.monotonic() + chaos.reconnect_s
        while True:
            result = await run_call(cfg.target, [], cfg.rate, cfg.codec, turn_timeout_s=cfg.turn_timeout_s,
                                    session_id=sid)
            if result.status == "OK" or time.monotonic() >= deadline:
                tally.hang_ups_failed += result.status != "OK"
                return
            await asyncio.sleep(RETRY_PAUSE_S)

    async def caller(i: int) -> None:
        await asyncio.sleep(rng.random() * min(1.0, 0.05 * calls))  # staggered arrivals
        k = 0
        while time.monotonic() < until:
            await one_call(i, k)
            k += 1

    lag: list[float] = []
    watcher = asyncio.create_task(watch_loop_lag(lag))
    tasks = [asyncio.create_task(caller(i)) for i in range(calls)]
    # a call started before the end may still need a recovery and its turns; nothing runs longer
    cut_after_s = chaos.recover_timeout_s + chaos.reconnect_s + (cfg.turns + 1) * cfg.turn_timeout_s
    done, pending = await asyncio.wait(tasks, timeout=chaos.minutes * 60 + cut_after_s)
    for task in pending:
        task.cancel()
        tally.calls_cut += 1
    await asyncio.gather(*pending, return_exceptions=True)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # a bug of this module, not a fault of the cluster: say so
    tally.wall_s = time.monotonic() - t0
    tally.loop_lag_ms = percentiles(lag)
    return tally


def run_chaos(cluster, cfg: LoadConfig, speech: list[np.ndarray], chaos: ChaosSettings, calls: int,
              on_turn=lambda: None, progress=lambda msg: None) -> dict:
    """The whole chaos run against a started LocalCluster; returns the report (chaos_report). Call it
    from the thread that started the cluster: the faults are injected from it, the calls run on an
    event loop in a thread of their own."""
    monkey = ChaosMonkey(cluster, chaos, progress)
    outcome: dict = {}

    def place_calls() -> None:
        try:
            outcome["tally"] = asyncio.run(chaos_calls(cfg, speech, calls, chaos, monkey, on_turn))
        except BaseException as exc:  # re-raised below, in the caller's thread
            outcome["error"] = exc
        finally:
            monkey.stop()

    t0 = time.monotonic()
    callers = threading.Thread(target=place_calls, name="chaos-calls", daemon=True)
    callers.start()
    try:
        monkey.run(until=t0 + chaos.minutes * 60)
    finally:
        callers.join()
    if "error" in outcome:
        raise outcome["error"]
    return chaos_report(cfg, chaos, calls, outcome["tally"], monkey.faults, t0)


def chaos_report(cfg: LoadConfig, chaos: ChaosSettings, calls: int, tally: ChaosTally, faults: list[Fault],
                 t0: float) -> dict:
    # the monkey starts a moment before the calls: report its times on the calls' clock (t0 ~ the same)
    failed = [t for t in tally.turns if t["error"]]
    return {
        "config": {**asdict(cfg), "calls": calls, **{f"chaos_{k}": v for k, v in asdict(chaos).items()}},
        "wall_s": round(tally.wall_s, 1),
        "turns": {"attempted": len(tally.turns), "completed": len(tally.turns) - len(failed),
                  "failed": len(failed), "failed_by_code": dict(Counter(t["error"] for t in failed)),
                  "failed_at_a_fault": sum(t["at_fault"] for t in failed),
                  "failed_outside_faults": sum(not t["at_fault"] for t in failed)},
        "calls": {"started": tally.calls_started, "completed": tally.calls_completed,
                  "lost": len(tally.lost) + tally.calls_cut, "cut": tally.calls_cut,
                  "refused_at_start": dict(tally.calls_refused), "reconnects": tally.reconnects,
                  "hang_ups_failed": tally.hang_ups_failed},
        "lost": tally.lost,
        "faults": [{"component": f.component, "fault": f.fault, "at_s": round(f.at - t0, 2),
                    "recovered_at_s": None if f.recovered_at is None else round(f.recovered_at - t0, 2),
                    "recovery_s": None if f.recovered_at is None else round(f.recovered_at - f.at, 2),
                    "error": f.error} for f in faults],
        "client_loop_lag_ms": tally.loop_lag_ms,
        "turn_log": tally.turns,  # the figure's data
    }


def chaos_text(report: dict) -> str:
    t, c = report["turns"], report["calls"]
    lines = [f"chaos {report['wall_s']:.0f} s, {report['config']['calls']} callers, "
             f"{len(report['faults'])} faults (one every {report['config']['chaos_every_s']:.0f} s of quiet)",
             f"turns attempted {t['attempted']}: completed {t['completed']}, failed {t['failed']} "
             f"{t['failed_by_code'] or ''} (at a fault {t['failed_at_a_fault']}, outside faults "
             f"{t['failed_outside_faults']})",
             f"calls started {c['started']}: completed {c['completed']}, LOST {c['lost']} (cut {c['cut']}); "
             f"resumed streams {c['reconnects']}; new calls refused at start {c['refused_at_start'] or 0}",
             f"{'at s':>8}  {'fault':<8}{'component':<10}{'recovery s':>11}"]
    for f in report["faults"]:
        rec = "-" if f["recovery_s"] is None else f"{f['recovery_s']:.1f}"
        lines.append(f"{f['at_s']:>8.1f}  {f['fault']:<8}{f['component']:<10}{rec:>11}  {f['error'][:80]}")
    for lost in report["lost"]:
        lines.append(f"lost: call {lost['call']} at {lost['at_s']} s: {lost['reason']}")
    return "\n".join(lines)


def chaos_html(report: dict) -> str:
    from html import escape

    from vitaserve.loadtest.report import chaos_figure

    image = chaos_figure(report["turn_log"], report["faults"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>vitaserve chaos</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}img{{max-width:100%}}</style>
</head><body><h1>Chaos under load</h1>
<img src="data:image/png;base64,{image}" alt="turns and faults over time">
<pre>{escape(chaos_text(report))}</pre>
<p>A turn is <b>at a fault</b> when its time span meets a fault's window (injection to recovery +
{report['config']['chaos_grace_s']:.0f} s). A call is <b>lost</b> when, after a failure, it cannot resume its
session within {report['config']['chaos_reconnect_s']:.0f} s of the fault being over, or its next turn fails
outside every fault window.</p>
</body></html>"""
