"""Benchmarks of the language model alone: per-mode latency of one call, and the batching engine.

Figures are medians over repeats after one uncounted warm-up. "First chunk" is the 11th new token:
one backbone token plus a 10-token audio chunk, as the paper measures with a 32-token prompt.
"""

from __future__ import annotations

import random
import statistics
import time

from vitaserve.common.percentiles import percentile
from vitaserve.generator.engine import Engine, Request
from vitaserve.generator.generate import generate
from vitaserve.generator.language_model import LanguageModel
from vitaserve.lmtext.sampling_params import SamplingParams

FIRST_CHUNK_INDEX = 10
GREEDY = SamplingParams(do_sample=False, repetition_penalty=1.05)


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


def bench_engine(lm: LanguageModel, concurrency: int, mode: str, prompt_len: int = 32,
                 max_new_tokens: int = 64, seed: int = 0) -> dict:
    """N calls submitted together, each with its own random prompt, greedy; aggregate tokens/s."""
    if concurrency > lm.model.num_slots:
        raise ValueError(f"concurrency {concurrency} exceeds the engine's {lm.model.num_slots} cache slots")
    rng = random.Random(seed)
    prompts = [random_prompt(lm, prompt_len, rng) for _ in range(concurrency)]

    def run() -> tuple[float, list[float]]:
        engine = Engine(lm)
        for i, prompt in enumerate(prompts):
            engine.add(Request(f"call-{i}", prompt, mode, GREEDY, max_new_tokens, stop_ids=()))
        first: dict[str, float] = {}
        start = time.perf_counter()
        n = 0
        while engine.has_work():
            for rid, event in engine.step():
                if isinstance(event, Exception):
                    raise event
                n += 1
                if event.index == FIRST_CHUNK_INDEX:
                    first[rid] = event.elapsed_s * 1000
        return n / (time.perf_counter() - start), sorted(first.values())

    run()  # warm-up
    tps, first = run()
    return {
        "concurrency": concurrency, "mode": mode, "tokens_per_s": round(tps, 2),
        "first_chunk_ms_p50": round(percentile(first, 50), 3),
        "first_chunk_ms_p95": round(percentile(first, 95), 3),
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
