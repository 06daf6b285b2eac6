"""Benchmarks of the language model alone: per-mode latency of one call, and the batching engine.

"First chunk" is the 11th new token in every mode: one backbone token plus VITA-Audio's first audio
block (the 10 tokens its MCTP modules emit after the first backbone forward, `VITA_FIRST_BLOCK`), as
the paper measures with a 32-token prompt and as benchmarks/official_compare.py times the official
code, so both sides of a comparison mean the same token. Figures are medians over repeats after one
uncounted warm-up.

The engine runs with random weights, whose greedy ids are an arbitrary mix of text and audio: the
real-time check of running calls counts every new token as audio (a real boost answer is audio after
its first text tokens), and the audio-only rate is reported beside it.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict

from vitaserve.common.audio_facts import TOKENS_PER_SECOND, VITA_FIRST_BLOCK
from vitaserve.common.percentiles import percentile
from vitaserve.generator.engine import Engine, Request
from vitaserve.generator.generate import generate
from vitaserve.generator.language_model import LanguageModel
from vitaserve.generator.scheduler import SchedulerConfig
from vitaserve.lmtext.sampling_params import SamplingParams

FIRST_CHUNK_INDEX = VITA_FIRST_BLOCK  # 0-based index of the 11th new token
GREEDY = SamplingParams(do_sample=False, repetition_penalty=1.05)
ARRIVALS = ("together", "staggered")
# random weights emit audio ids about one time in ten: the scheduler's real-time lead counts every
# token, as this benchmark's real-time check does (12.5 tokens/s), so its policy is what is measured
BENCH_SCHEDULER = SchedulerConfig(every_token_is_audio=True)
SAMPLINGS = ("greedy", "checkpoint")  # checkpoint: generation_config.json's sampling, what callers get by default


def call_sampling(lm: LanguageModel, sampling: str, call: int) -> SamplingParams:
    """The sampling of benchmark call number `call`: greedy (the official comparison's), or the
    checkpoint's defaults with a seed per call, so a run repeats exactly."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    return GREEDY if sampling == "greedy" else SamplingParams.from_defaults(lm.defaults, seed=call)


def random_prompt(lm: LanguageModel, length: int, rng: random.Random) -> list[int]:
    # text-side ids, as a real prompt would be mostly made of
    return [rng.randrange(lm.vocab.endoftext_id) for _ in range(length)]


def bench_modes(lm: LanguageModel, modes: list[str], prompt_len: int = 32, max_new_tokens: int = 64,
                repeats: int = 3, seed: int = 0) -> list[dict]:
    """One call at a time: time to the first chunk and tokens/s, per mode."""
    rng = random.Random(seed)
    prompt = random_prompt(lm, prompt_len, rng)
    rows = []
    for mode in modes:
        list(generate(lm, prompt, mode, GREEDY, max_new_tokens=max_new_tokens, stop_ids=()))  # warm-up
        first, tps = [], []
        for _ in range(repeats):
            events = list(generate(lm, prompt, mode, GREEDY, max_new_tokens=max_new_tokens, stop_ids=()))
            first.append(events[FIRST_CHUNK_INDEX].elapsed_s * 1000)
            tps.append(len(events) / events[-1].elapsed_s)
        rows.append({
            "mode": mode, "first_chunk_ms": round(statistics.median(first), 3),
            "tokens_per_s": round(statistics.median(tps), 2),
            "ms_per_token": round(1000 / statistics.median(tps), 3),
        })
    return rows


def _check_shape(lm: LanguageModel, concurrency: int, prompt_len: int, max_new_tokens: int) -> None:
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if concurrency > lm.model.num_slots:
        raise ValueError(f"concurrency {concurrency} exceeds the engine's {lm.model.num_slots} cache slots")
    if max_new_tokens <= FIRST_CHUNK_INDEX:
        raise ValueError(f"max_new_tokens must be > {FIRST_CHUNK_INDEX} to reach the first chunk")
    lm.validate_prompt([0] * prompt_len, max_new_tokens)


def _step(engine: Engine) -> list:
    out = engine.step()
    for _, event in out:
        if isinstance(event, Exception):
            raise event
    return out


def lone_call(lm: LanguageModel, mode: str, prompt: list[int], max_new_tokens: int, repeats: int = 3,
              sampling: str = "greedy") -> dict:
    """A call alone on the engine: median first chunk (ms) and tokens/s over `repeats` runs."""
    first, tps = [], []
    for _ in range(repeats):
        events = list(generate(lm, prompt, mode, call_sampling(lm, sampling, 0), max_new_tokens=max_new_tokens,
                               stop_ids=()))
        first.append(events[FIRST_CHUNK_INDEX].elapsed_s * 1000)
        tps.append(len(events) / events[-1].elapsed_s)
    return {"first_chunk_ms": round(statistics.median(first), 3), "tokens_per_s": round(statistics.median(tps), 2)}


def bench_engine(lm: LanguageModel, concurrency: int, mode: str, prompt_len: int = 32,
                 max_new_tokens: int = 64, seed: int = 0, arrival: str = "together", joiners: int = 4,
                 max_gap_steps: int = 8, lone_repeats: int = 3, sampling: str = "greedy") -> dict:
    """The engine under `concurrency` calls, each with its own random prompt (greedy, or sampled as the
    checkpoint says), and a lone call beside it (same prompt length, same run): see bench_together
    and bench_staggered."""
    call_sampling(lm, sampling, 0)  # a bad name fails before any work
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    _check_shape(lm, concurrency, prompt_len, max_new_tokens)
    if arrival == "staggered":
        _check_staggered(concurrency, joiners, max_gap_steps)
    rng = random.Random(seed)
    lone_prompt = random_prompt(lm, prompt_len, rng)
    list(generate(lm, lone_prompt, mode, GREEDY, max_new_tokens=max_new_tokens, stop_ids=()))  # warm-up
    lone = lone_call(lm, mode, lone_prompt, max_new_tokens, lone_repeats, sampling)
    row = {"arrival": arrival, "concurrency": concurrency, "mode": mode, "sampling": sampling,
           "scheduler": asdict(BENCH_SCHEDULER),
           "lone_first_chunk_ms": lone["first_chunk_ms"], "lone_tokens_per_s": lone["tokens_per_s"]}
    if arrival == "together":
        row.update(bench_together(lm, concurrency, mode, prompt_len, max_new_tokens, rng, sampling))
        row["first_chunk_max_over_lone"] = round(row["first_chunk_ms_max"] / lone["first_chunk_ms"], 2)
        # every call needs the same first tokens, made at tokens_per_s for all: the last call's first
        # chunk takes about concurrency times as long as a lone call's at its own rate, whatever the
        # schedule (an estimate of the machine's floor: prefill is counted in both rates alike)
        row["first_chunk_floor_over_lone"] = round(concurrency * lone["tokens_per_s"] / row["tokens_per_s"], 2)
    else:
        row.update(bench_staggered(lm, concurrency, mode, prompt_len, max_new_tokens, rng, joiners, max_gap_steps,
                                   sampling))
        row["joining_first_chunk_p50_over_lone"] = round(row["joining_first_chunk_ms_p50"] / lone["first_chunk_ms"], 2)
        row["joining_first_chunk_max_over_lone"] = round(row["joining_first_chunk_ms_max"] / lone["first_chunk_ms"], 2)
        # above 1 the running calls cannot all keep real time whatever the schedule: real time for
        # them needs more tokens a second than the engine made for everyone in the join period
        row["real_time_need_over_throughput"] = round((concurrency - 1) * TOKENS_PER_SECOND / row["tokens_per_s"], 2)
    return row


def _check_staggered(concurrency: int, joiners: int, max_gap_steps: int) -> None:
    if joiners < 1:
        raise ValueError(f"joiners must be >= 1, got {joiners}")
    if max_gap_steps < 0:
        raise ValueError(f"max_gap_steps must be >= 0, got {max_gap_steps}")
    if concurrency < 2:
        raise ValueError("staggered arrival needs concurrency >= 2: calls to join and one that joins")


def bench_together(lm: LanguageModel, concurrency: int, mode: str, prompt_len: int, max_new_tokens: int,
                   rng: random.Random, sampling: str = "greedy") -> dict:
    """`concurrency` calls submitted at once: tokens/s of all of them, and each one's first chunk."""
    prompts = [random_prompt(lm, prompt_len, rng) for _ in range(concurrency)]

    def run() -> tuple[float, list[float], list[float]]:
        engine = Engine(lm, scheduler=BENCH_SCHEDULER)
        for i, prompt in enumerate(prompts):
            engine.add(Request(f"call-{i}", prompt, mode, call_sampling(lm, sampling, i), max_new_tokens,
                               stop_ids=()))
        first: dict[str, float] = {}
        last: dict[str, tuple[int, float]] = {}
        start = time.perf_counter()
        n = 0
        while engine.has_work():
            for rid, event in _step(engine):
                n += 1
                last[rid] = (event.index, event.elapsed_s)
                if event.index == FIRST_CHUNK_INDEX:
                    first[rid] = event.elapsed_s
        # each call's own rate once its first chunk is out: what its listener needs to keep up
        rates = [(last[r][0] - FIRST_CHUNK_INDEX) / (last[r][1] - first[r]) for r in first if last[r][1] > first[r]]
        return n / (time.perf_counter() - start), sorted(v * 1000 for v in first.values()), rates

    run()  # warm-up
    tps, first, rates = run()
    return {
        "tokens_per_s": round(tps, 2),
        "first_chunk_ms_p50": round(percentile(first, 50), 3),
        "first_chunk_ms_p95": round(percentile(first, 95), 3),
        "first_chunk_ms_max": round(max(first), 3),
        "per_call_tokens_per_s_min": round(min(rates), 2) if rates else None,
        "real_time_tokens_per_s": TOKENS_PER_SECOND,
        "every_call_real_time": bool(rates) and min(rates) >= TOKENS_PER_SECOND,
    }


def bench_staggered(lm: LanguageModel, concurrency: int, mode: str, prompt_len: int, max_new_tokens: int,
                    rng: random.Random, joiners: int = 4, max_gap_steps: int = 8, sampling: str = "greedy") -> dict:
    """`concurrency - 1` calls start together and keep running; once all of them are past their first
    chunk, `joiners` calls join one after another, each at a random (seeded) 0..max_gap_steps engine
    steps after the previous joiner ended, so each joins `concurrency - 1` running calls at a random
    point of their schedules. Arrival is counted in engine steps, not seconds, so a seed gives the
    same arrival points on a fast and a slow machine.

    Reports the joiners' first chunks apart from the running calls', and each running call's rate over
    the join period (first arrival to last joiner's end) against real time, with its longest gap."""
    _check_staggered(concurrency, joiners, max_gap_steps)
    running_n = concurrency - 1
    background_tokens = lm.model.max_len - prompt_len  # never end by themselves; cancelled at the end
    engine = Engine(lm, scheduler=BENCH_SCHEDULER)
    running = [f"running-{i}" for i in range(running_n)]
    for i, rid in enumerate(running):
        engine.add(Request(rid, random_prompt(lm, prompt_len, rng), mode, call_sampling(lm, sampling, i),
                           background_tokens, stop_ids=()))
    running_first: dict[str, float] = {}
    stamps: dict[str, list[tuple[float, bool]]] = {rid: [] for rid in running}  # (time, is audio) per token
    joining_first: list[float] = []
    gaps = [rng.randrange(max_gap_steps + 1) for _ in range(joiners)]
    joined = 0
    current: str | None = None
    wait = None  # steps until the next joiner arrives; None until every running call is past its first chunk
    window_start = window_end = None
    while joined < joiners or current is not None:
        if current is None and wait is not None:
            if wait == 0:
                current = f"joining-{joined}"
                engine.add(Request(current, random_prompt(lm, prompt_len, rng), mode,
                                   call_sampling(lm, sampling, running_n + joined), max_new_tokens, stop_ids=()))
                window_start = window_start or time.perf_counter()
                joined += 1
            else:
                wait -= 1
        events = _step(engine)
        if not events and not engine.has_work():
            raise RuntimeError("the engine ran out of work before every joiner ended")
        now = time.perf_counter()
        for rid, event in events:
            if rid in stamps:
                stamps[rid].append((now, event.is_audio))
                if event.index == FIRST_CHUNK_INDEX:
                    running_first[rid] = event.elapsed_s * 1000
                if event.finished:
                    raise RuntimeError(f"running call {rid} ended before the joiners: raise --max-len")
            else:
                if event.index == FIRST_CHUNK_INDEX:
                    joining_first.append(event.elapsed_s * 1000)
                if event.finished:
                    current, window_end = None, now
                    wait = gaps[joined] if joined < joiners else None
        if wait is None and joined == 0 and len(running_first) == running_n:
            wait = gaps[0]
    for rid in running:
        engine.cancel(rid)
    span = window_end - window_start
    rates, audio_rates, longest_gap = [], [], 0.0
    for rid in running:
        inside = [(t, a) for t, a in stamps[rid] if window_start <= t <= window_end]
        rates.append(len(inside) / span)
        audio_rates.append(sum(a for _, a in inside) / span)
        times = [window_start] + [t for t, _ in inside] + [window_end]
        longest_gap = max(longest_gap, max(b - a for a, b in zip(times, times[1:])))
    return {
        "joiners": joiners, "max_gap_steps": max_gap_steps,
        "joining_first_chunk_ms": [round(x, 3) for x in joining_first],
        "joining_first_chunk_ms_p50": round(percentile(joining_first, 50), 3),
        "joining_first_chunk_ms_max": round(max(joining_first), 3),
        "running_first_chunk_ms_p50": round(percentile(list(running_first.values()), 50), 3),
        "running_tokens_per_s_min": round(min(rates), 2),
        "running_tokens_per_s_p50": round(percentile(rates, 50), 2),
        "running_audio_tokens_per_s_min": round(min(audio_rates), 2),
        "real_time_tokens_per_s": TOKENS_PER_SECOND,
        "running_keep_real_time": min(rates) >= TOKENS_PER_SECOND,
        "running_longest_gap_ms": round(longest_gap * 1000, 3),
        "tokens_per_s": round(sum(rates) + (joiners * max_new_tokens) / span, 2),
        "join_period_s": round(span, 3),
    }


def modes_summary(lm: LanguageModel, rows: list[dict]) -> dict:
    """The checkpoint's parameter count and, when both ran, vanilla's first chunk over boost's (what
    MCTP buys; both measured in the same run)."""
    summary = {"params": sum(p.numel() for p in lm.model.parameters())}
    by_mode = {r["mode"]: r for r in rows}
    if "vanilla" in by_mode and "boost" in by_mode:
        summary["vanilla_over_boost_first_chunk"] = round(
            by_mode["vanilla"]["first_chunk_ms"] / by_mode["boost"]["first_chunk_ms"], 2)
    return summary
