"""Soak: N callers, each placing call after call (several turns, barge-ins) for a bounded time, while
the resident memory of every process of the local cluster is sampled; then Redis is checked.

What it proves (issue 12): memory is bounded, i.e. no process grows more than GROWTH_BOUND_PCT
between the end of the warm-up (minute 2: models loaded, allocator pools and caches filled by the
first calls) and the end; and Redis holds after the calls what it held before them (or, where a key
outlives its call on purpose, only keys bounded by a TTL: the report says which and for how long).

Bounded: callers start no call after the soak time, a call in progress finishes its turns (each
bounded by the turn timeout) and every call still running at soak time + CUT_AFTER_S is cut.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from vitaserve.client.phone import run_call
from vitaserve.loadtest import redis_keys
from vitaserve.loadtest.report import TurnMeasurement, percentiles
from vitaserve.loadtest.rss import GROWTH_BOUND_PCT, WINDOW_S, RssSampler, RssSeries, growth
from vitaserve.loadtest.runner import LoadConfig, LoadConfigError, measurements, run_callers

CALL_ID_STRIDE = 100_000  # call ids are caller * stride + the caller's call number: unique, readable


@dataclass(frozen=True)
class SoakSettings:
    minutes: float
    warmup_s: float = 120.0  # growth is measured from here to the end
    sample_s: float = 3.0  # RSS sampling period: ~10 samples per median window (rss.WINDOW_S)
    settle_s: float = 15.0  # after the calls: how long Redis may take to drop what they left

    def __post_init__(self):
        if self.minutes <= 0:
            raise LoadConfigError(f"soak minutes must be positive, got {self.minutes}")
        if not 0 <= self.warmup_s < self.minutes * 60:
            raise LoadConfigError(f"the warm-up ({self.warmup_s:.0f} s) must end before the soak does "
                                  f"({self.minutes * 60:.0f} s)")
        if self.sample_s <= 0 or self.settle_s < 0:
            raise LoadConfigError("the sampling period must be positive and the settle time not negative")


@dataclass
class SoakCalls:
    turns: list[TurnMeasurement] = field(default_factory=list)
    calls_ok: int = 0
    calls_failed: Counter = field(default_factory=Counter)  # status -> calls
    wall_s: float = 0.0
    loop_lag_ms: dict = field(default_factory=dict)


async def soak_calls(cfg: LoadConfig, speech: list[np.ndarray], calls: int, soak_s: float,
                     on_turn=lambda: None) -> SoakCalls:
    """`calls` callers place call after call of `cfg.turns` turns until `soak_s` has passed."""
    if not speech:
        raise LoadConfigError("no utterances to speak")
    rng = random.Random(cfg.seed)
    out = SoakCalls()
    mode = cfg.modes[0]
    started = time.monotonic()
    until = started + soak_s

    async def caller(i: int) -> None:
        await asyncio.sleep(rng.random() * min(1.0, 0.05 * calls))  # staggered arrivals
        k = 0
        while time.monotonic() < until:
            picks = [speech[(i + k + j) % len(speech)] for j in range(cfg.turns)]
            barge = [rng.random() < cfg.barge_in_prob for _ in picks]
            result = await run_call(cfg.target, picks, cfg.rate, cfg.codec, mode=mode, push_to_talk=cfg.push_to_talk,
                                    max_new_tokens=cfg.max_new_tokens, greedy=True,
                                    turn_timeout_s=cfg.turn_timeout_s, barge_in=barge)
            out.turns.extend(measurements(result, mode, calls, i * CALL_ID_STRIDE + k))
            for _ in result.turns:
                on_turn()
            if result.status == "OK":
                out.calls_ok += 1
            else:
                out.calls_failed[result.status] += 1
            k += 1

    cut_after_s = cfg.turns * cfg.turn_timeout_s + 10  # the longest a call started before `until` may take
    lag = await run_callers([caller(i) for i in range(calls)], soak_s + cut_after_s, out.calls_failed, "SOAK_CUT")
    out.wall_s = time.monotonic() - started
    out.loop_lag_ms = percentiles(lag)
    return out


def wait_keys_settle(redis, before: list[str], settle_s: float, namespace: str) -> list[str]:
    """The namespace's keys once they are back to `before`, or after `settle_s`, whichever first."""
    deadline = time.monotonic() + settle_s
    while True:
        after = redis_keys.namespace_keys(redis, namespace)
        if set(after) <= set(before) or time.monotonic() >= deadline:
            return after
        time.sleep(0.5)


def run_soak(cluster, cfg: LoadConfig, speech: list[np.ndarray], soak: SoakSettings, calls: int,
             namespace: str = redis_keys.keys.DEFAULT_NAMESPACE, on_turn=lambda: None) -> dict:
    """The whole soak against a started LocalCluster; returns the report (soak_report)."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(cluster.redis_url)
    try:
        before = redis_keys.namespace_keys(client, namespace)

        def groups() -> dict[str, int]:  # read at every sample: a restarted service is followed
            return {s.name: s.proc.pid for s in cluster.services if s.proc.poll() is None}

        with RssSampler(groups, soak.sample_s) as sampler:
            result = asyncio.run(soak_calls(cfg, speech, calls, soak.minutes * 60, on_turn))
        after = wait_keys_settle(client, before, soak.settle_s, namespace)
        left = redis_keys.leftovers(client, before, after, namespace)
    finally:
        client.close()
    return soak_report(cfg, soak, calls, result, sampler.series, before, after, left, namespace)


def soak_report(cfg: LoadConfig, soak: SoakSettings, calls: int, result: SoakCalls, series: RssSeries,
                before: list[str], after: list[str], left: dict, namespace: str) -> dict:
    rss = growth(series, soak.warmup_s)
    judged = [r for r in rss.values() if r["ok"] is not None]
    errors = Counter(t.error.split(":")[0] for t in result.turns if t.error)
    ended_only = set(left["sessions_by_status"]) <= {"ended"}
    return {
        "config": {**asdict(cfg), "calls": calls, **{f"soak_{k}": v for k, v in asdict(soak).items()},
                   "rss_window_s": WINDOW_S, "growth_bound_pct": GROWTH_BOUND_PCT},
        "wall_s": round(result.wall_s, 1),
        "calls": {"ok": result.calls_ok, "failed": dict(result.calls_failed)},
        "turns": {"total": len(result.turns), "failed_by_code": dict(errors),
                  "interrupted": sum(t.interrupted for t in result.turns)},
        "first_audio_ms": percentiles([t.first_audio_ms for t in result.turns
                                       if not t.error and t.first_audio_ms is not None]),
        "client_loop_lag_ms": result.loop_lag_ms,
        "rss": rss,
        "rss_ok": bool(judged) and all(r["ok"] for r in judged),
        "rss_unjudged": sorted(name for name, r in rss.items() if r["ok"] is None),
        "redis_keys": {
            "namespace": namespace,
            "before": redis_keys.count_by_kind(before, namespace),
            "after": redis_keys.count_by_kind(after, namespace),
            "left": left,
            "back_to_baseline": set(after) <= set(before),
            # what stays is bounded if every key left expires and no session is still open
            "left_bounded": left["without_ttl"] == 0 and ended_only,
        },
        "rss_series": {"t_s": series.t_s, "rss_kb": series.rss_kb},  # the figure's data
    }


def soak_text(report: dict) -> str:
    """The terminal summary: calls and turns, RSS per process with its growth, Redis keys."""
    bound = report["config"]["growth_bound_pct"]
    lines = [f"soak {report['wall_s']:.0f} s, {report['config']['calls']} callers: calls ok {report['calls']['ok']}, "
             f"failed {report['calls']['failed'] or 0}; turns {report['turns']['total']} "
             f"(failed {report['turns']['failed_by_code'] or 0}, interrupted {report['turns']['interrupted']}); "
             f"first audio p50/p95 {report['first_audio_ms']['p50']}/{report['first_audio_ms']['p95']} ms",
             f"{'process':<44}{'RSS warm-up MiB':>16}{'RSS end MiB':>13}{'growth %':>10}{'2nd half %':>11}  verdict"]
    for name, r in report["rss"].items():
        mib = lambda kb: "-" if kb is None else f"{kb / 1024:.1f}"  # noqa: E731
        verdict = "n/a" if r["ok"] is None else ("ok" if r["ok"] else f"OVER {bound} %")
        pct, tail = ("-" if v is None else f"{v:+.2f}" for v in (r["growth_pct"], r["tail_growth_pct"]))
        lines.append(f"{name:<44}{mib(r['rss_warmup_kb']):>16}{mib(r['rss_end_kb']):>13}{pct:>10}{tail:>11}  {verdict}")
    keys_ = report["redis_keys"]
    left = keys_["left"]
    lines.append(f"RSS growth under {bound} % for every process: {'yes' if report['rss_ok'] else 'NO'}")
    lines.append(f"Redis keys ({keys_['namespace']}:*) before {keys_['before']['total']}, after "
                 f"{keys_['after']['total']}: back to baseline {'yes' if keys_['back_to_baseline'] else 'NO'}")
    if not keys_["back_to_baseline"]:
        lines.append(f"  left: {left['keys']}, sessions by status {left['sessions_by_status']}, longest TTL "
                     f"by kind {left['max_ttl_s']} s, without TTL {left['without_ttl']}: "
                     f"{'all bounded by a TTL' if keys_['left_bounded'] else 'NOT bounded'}")
    return "\n".join(lines)


def soak_html(report: dict) -> str:
    """One self-contained page: the RSS plot (PNG, inline) and the terminal summary."""
    from html import escape

    from vitaserve.loadtest.report import rss_figure

    image = rss_figure(report["rss_series"]["t_s"], report["rss_series"]["rss_kb"], report["config"]["soak_warmup_s"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>vitaserve soak</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}img{{max-width:100%}}</style>
</head><body><h1>Soak: resident memory and Redis keys</h1>
<img src="data:image/png;base64,{image}" alt="RSS over time">
<pre>{escape(soak_text(report))}</pre>
<p><b>RSS</b>: VmRSS of every process of each service's process group (/proc), sampled every
{report['config']['soak_sample_s']} s; the figure at an instant is the median of the samples in the
{report['config']['rss_window_s']:.0f} s before it. <b>growth</b>: from the end of the warm-up
({report['config']['soak_warmup_s']:.0f} s) to the end. <b>Redis keys</b>: SCAN of the namespace before
the first call and after the last one (allowing {report['config']['soak_settle_s']:.0f} s to settle).</p>
</body></html>"""
