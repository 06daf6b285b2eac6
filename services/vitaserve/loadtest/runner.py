"""Drive N concurrent phone-like calls per (mode, concurrency) level; collect per-turn measurements.

Every call is bounded: a turn timeout, a per-level deadline, a whole-run duration and a fixed
number of turns, so a run always ends by itself. Calls start staggered, as real traffic does. The
client's own event-loop lag is measured too: a loaded client delays frames and timestamps, and a
report that hides it would blame the server.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from vitaserve.client.phone import CallResult
from vitaserve.common.tls import ClientTls
from vitaserve.gateway.codecs import check_format
from vitaserve.loadtest.protocols import PROTOCOLS, place_call
from vitaserve.loadtest.report import TurnMeasurement, percentiles, playout_starvation


class LoadConfigError(ValueError):
    """A load-test setting that cannot run."""


@dataclass(frozen=True)
class LoadConfig:
    target: str
    modes: tuple[str, ...] = ("boost",)
    concurrency: tuple[int, ...] = (1, 4)
    turns: int = 2
    codec: str = "mulaw"
    rate: int = 8000
    push_to_talk: bool = False  # END_OF_UTTERANCE after each utterance instead of waiting for the VAD
    barge_in_prob: float = 0.0
    max_new_tokens: int = 0
    turn_timeout_s: float = 120.0
    level_timeout_s: float = 600.0
    duration_s: float = 3600.0  # the whole run; levels not reached are skipped, a running one is cut
    ramp_slo_ms: float | None = None  # ramp: double the calls until p95 first audio exceeds this
    max_concurrency: int = 64
    seed: int = 0
    tls_ca: str | None = None  # the gateway serves TLS; callers trust this CA (PEM file)
    protocol: str = "grpc"  # how calls are placed (loadtest/protocols.py); target is that protocol's address

    def caller_tls(self) -> ClientTls | None:
        return ClientTls(self.tls_ca) if self.tls_ca else None

    def __post_init__(self):
        if not self.modes or not all(self.modes):
            raise LoadConfigError(f"modes must be non-empty names, got {self.modes!r}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise LoadConfigError(f"concurrency levels must be >= 1, got {self.concurrency!r}")
        if self.turns < 1:
            raise LoadConfigError(f"turns must be >= 1, got {self.turns}")
        if not 0.0 <= self.barge_in_prob <= 1.0:
            raise LoadConfigError(f"barge-in probability must be in [0, 1], got {self.barge_in_prob}")
        if min(self.turn_timeout_s, self.level_timeout_s, self.duration_s) <= 0:
            raise LoadConfigError("timeouts and duration must be positive")
        if self.ramp_slo_ms is not None and self.ramp_slo_ms <= 0:
            raise LoadConfigError(f"the ramp objective must be a positive number of ms, got {self.ramp_slo_ms}")
        try:
            check_format(self.codec, self.rate)
        except ValueError as exc:
            raise LoadConfigError(str(exc)) from None
        if self.protocol not in PROTOCOLS:
            raise LoadConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.protocol != "grpc" and self.tls_ca:
            raise LoadConfigError(f"--tls-ca is for gRPC calls; {self.protocol} calls here are plaintext")
        if self.max_concurrency < 1:
            raise LoadConfigError(f"max concurrency must be >= 1, got {self.max_concurrency}")


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    turns: list[TurnMeasurement] = field(default_factory=list)
    failed: Counter = field(default_factory=Counter)  # status code -> calls
    wall_s: float = 0.0
    loop_lag_ms: dict = field(default_factory=dict)  # the client's event-loop lag percentiles


def measurements(result: CallResult, mode: str, concurrency: int, call: int) -> list[TurnMeasurement]:
    out = []
    for t in result.turns:
        stall, longest = playout_starvation(t.chunk_arrivals, t.chunk_durations)
        out.append(TurnMeasurement(
            mode=mode, concurrency=concurrency, call=call, turn=t.turn, first_audio_ms=t.first_audio_ms,
            first_text_ms=t.first_text_ms, duration_s=t.chunk_arrivals[-1] if t.chunk_arrivals else 0.0,
            audio_s=t.audio_s, chunks=t.chunks, starvation_s=stall, max_gap_s=longest, interrupted=t.interrupted,
            server=t.server_timings, error=t.error,
            chunk_arrivals_ms=[round(a * 1000, 1) for a in t.chunk_arrivals],
            text_tokens=getattr(t, "text_tokens", 0), audio_tokens=getattr(t, "audio_tokens", 0)))
    return out


async def watch_loop_lag(samples: list[float], period_s: float = 0.02) -> None:
    """Append how late each `period_s` sleep woke up (ms) until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(period_s)
        samples.append((loop.time() - start - period_s) * 1000)


async def run_level(cfg: LoadConfig, mode: str, concurrency: int, speech: list[np.ndarray],
                    on_turn=lambda: None, deadline_s: float | None = None) -> LevelResult:
    """`concurrency` calls at once, each `cfg.turns` turns; cut at the level timeout or `deadline_s`
    (a time.monotonic() instant), whichever comes first; cut calls count as LEVEL_TIMEOUT."""
    if not speech:
        raise LoadConfigError("no utterances to speak")
    rng = random.Random(cfg.seed * 1000 + concurrency)
    level = LevelResult(mode, concurrency)

    async def one_call(i: int) -> None:
        await asyncio.sleep(rng.random() * min(1.0, 0.05 * concurrency))  # staggered arrivals
        picks = [speech[(i + k) % len(speech)] for k in range(cfg.turns)]
        barge = [rng.random() < cfg.barge_in_prob for _ in picks]
        result = await place_call(cfg, picks, mode, barge)
        level.turns.extend(measurements(result, mode, concurrency, i))
        for _ in result.turns:
            on_turn()
        if result.status != "OK":
            level.failed[result.status] += 1

    started = time.monotonic()
    timeout = cfg.level_timeout_s if deadline_s is None else max(0.0, min(cfg.level_timeout_s, deadline_s - started))
    lag = await run_callers([one_call(i) for i in range(concurrency)], timeout, level.failed, "LEVEL_TIMEOUT")
    level.wall_s = time.monotonic() - started
    level.loop_lag_ms = percentiles(lag)
    return level


async def run_callers(callers: list, timeout_s: float, failed: Counter, cut_as: str) -> list[float]:
    """Run the callers at once for at most timeout_s while the client's own event-loop lag is
    sampled; a caller still running then is cancelled and counted in `failed` as `cut_as`, one that
    raised under its exception's name. Returns the lag samples (ms)."""
    lag: list[float] = []
    watcher = asyncio.create_task(watch_loop_lag(lag))
    tasks = [asyncio.create_task(c) for c in callers]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
        failed[cut_as] += 1
    await asyncio.gather(*pending, return_exceptions=True)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            failed[type(task.exception()).__name__] += 1
    return lag


def levels(cfg: LoadConfig) -> list[int]:
    if cfg.ramp_slo_ms is None:
        return list(cfg.concurrency)
    out, n = [], 1
    while n <= cfg.max_concurrency:
        out.append(n)
        n *= 2
    return out


def over_objective(level: LevelResult, slo_ms: float) -> bool:
    """A ramp stops after a level whose p95 first audio broke the objective, or that lost a call."""
    p95 = percentiles([t.first_audio_ms for t in level.turns if t.first_audio_ms is not None])["p95"]
    return p95 is None or p95 > slo_ms or bool(level.failed)


async def run_load(cfg: LoadConfig, speech: list[np.ndarray], progress=None) -> list[LevelResult]:
    """Every mode at every level (a ramp stops a mode at the first level over the objective), all
    within `cfg.duration_s`."""
    deadline = time.monotonic() + cfg.duration_s
    results = []
    for mode in cfg.modes:
        for n in levels(cfg):
            if time.monotonic() >= deadline:
                return results
            level = await run_level(cfg, mode, n, speech, on_turn=(progress or (lambda: None)), deadline_s=deadline)
            results.append(level)
            if cfg.ramp_slo_ms is not None and over_objective(level, cfg.ramp_slo_ms):
                break
    return results


def failed_calls(results: list[LevelResult]) -> Counter:
    """(mode, concurrency) -> calls that ended without finishing, for the levels that lost any."""
    return Counter({(lv.mode, lv.concurrency): sum(lv.failed.values()) for lv in results if lv.failed})


def error_counts(results: list[LevelResult]) -> Counter:
    """Every error of a run by kind: lost calls by status, failed turns by their Error code."""
    errors: Counter = Counter()
    for lv in results:
        errors.update(lv.failed)
    for t in (t for lv in results for t in lv.turns):
        if t.error:
            errors[t.error.split(":")[0]] += 1
    return errors
