"""Drive N concurrent phone-like calls per (mode, concurrency) level; collect per-turn measurements.

Every call is bounded: a turn timeout, a per-level deadline, and a fixed number of turns, so a
run always ends by itself. Calls start staggered over one second, as real traffic does.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from vitaserve.gateway.phone import CallResult, run_call
from vitaserve.loadtest.report import TurnMeasurement, playout_starvation


@dataclass(frozen=True)
class LoadConfig:
    target: str
    modes: tuple[str, ...] = ("boost",)
    concurrency: tuple[int, ...] = (1, 4)
    turns: int = 2
    codec: str = "mulaw"
    rate: int = 8000
    barge_in_prob: float = 0.0
    max_new_tokens: int = 0
    turn_timeout_s: float = 120.0
    level_timeout_s: float = 600.0
    ramp_slo_ms: float | None = None  # ramp: double the calls until p95 first audio exceeds this
    max_concurrency: int = 64
    seed: int = 0


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    turns: list[TurnMeasurement] = field(default_factory=list)
    failed: Counter = field(default_factory=Counter)  # status code -> calls


def measurements(result: CallResult, mode: str, concurrency: int, call: int) -> list[TurnMeasurement]:
    out = []
    for t in result.turns:
        stall, longest = playout_starvation(t.chunk_arrivals, t.chunk_durations)
        duration = (t.chunk_arrivals[-1] if t.chunk_arrivals else 0.0)
        out.append(TurnMeasurement(
            mode=mode, concurrency=concurrency, call=call, turn=t.turn, first_audio_ms=t.first_audio_ms,
            first_text_ms=t.first_text_ms, duration_s=duration, audio_s=t.audio_s, chunks=t.chunks,
            starvation_s=stall, max_gap_s=longest, interrupted=t.interrupted, server=t.server_timings,
            error=t.error))
    return out


async def run_level(cfg: LoadConfig, mode: str, concurrency: int, speech: list[np.ndarray],
                    on_turn=lambda: None) -> LevelResult:
    rng = random.Random(cfg.seed * 1000 + concurrency)
    level = LevelResult(mode, concurrency)

    async def one_call(i: int) -> None:
        await asyncio.sleep(rng.random() * min(1.0, 0.05 * concurrency))  # staggered arrivals
        picks = [speech[(i + k) % len(speech)] for k in range(cfg.turns)]
        barge = [rng.random() < cfg.barge_in_prob for _ in picks]
        result = await run_call(cfg.target, picks, cfg.rate, cfg.codec, mode=mode, max_new_tokens=cfg.max_new_tokens,
                                greedy=True, turn_timeout_s=cfg.turn_timeout_s, barge_in=barge)
        level.turns.extend(measurements(result, mode, concurrency, i))
        for _ in result.turns:
            on_turn()
        if result.status != "OK":
            level.failed[result.status] += 1

    tasks = [asyncio.create_task(one_call(i)) for i in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=cfg.level_timeout_s)
    for task in pending:
        task.cancel()
        level.failed["LEVEL_TIMEOUT"] += 1
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            level.failed[type(task.exception()).__name__] += 1
    return level


def levels(cfg: LoadConfig) -> list[int]:
    if cfg.ramp_slo_ms is None:
        return list(cfg.concurrency)
    out, n = [], 1
    while n <= cfg.max_concurrency:
        out.append(n)
        n *= 2
    return out


async def run_load(cfg: LoadConfig, speech: list[np.ndarray], progress=None) -> list[LevelResult]:
    """Every mode at every level (a ramp stops a mode at the first level over the objective)."""
    from vitaserve.loadtest.report import percentiles

    results = []
    for mode in cfg.modes:
        for n in levels(cfg):
            started = time.monotonic()
            level = await run_level(cfg, mode, n, speech, on_turn=(progress or (lambda: None)))
            level.wall_s = time.monotonic() - started
            results.append(level)
            if cfg.ramp_slo_ms is not None:
                p95 = percentiles([t.first_audio_ms for t in level.turns if t.first_audio_ms is not None])["p95"]
                if p95 is None or p95 > cfg.ramp_slo_ms or level.failed:
                    break
    return results
