"""What TLS adds to first-audio latency: the same levels on a plaintext and a TLS cluster, same run.

Two local clusters run side by side on this machine; each concurrency level runs on one, then on
the other (plain, TLS, plain, TLS, ...) for several rounds, so a slow minute of a shared machine
falls on both sides instead of on one. Per level and side: first-audio percentiles over every round
(the levels' own `summarize` rows), and each round's p50/p95. The difference TLS - plain is given
pooled and per round (the paired difference of the round's two runs, which ran back to back): when
the per-round differences do not all have the same sign, the difference is within the noise.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

from vitaserve.loadtest.report import (TurnMeasurement, _ms, _png, _pyplot, percentiles, plots, summarize,
                                       text_table)
from vitaserve.loadtest.runner import LevelResult, LoadConfig, run_level

SIDES = ("plain", "tls")  # the order within a round: plaintext first, then TLS


def alternation(concurrency: tuple[int, ...], repeats: int) -> list[tuple[int, int, str]]:
    """(round, level, side) in run order: every round runs each level on both sides back to back."""
    return [(r, n, side) for r in range(1, repeats + 1) for n in concurrency for side in SIDES]


@dataclass
class SideRun:
    """One level on one side in one round."""
    round: int
    side: str
    level: LevelResult


async def run_comparison(configs: dict[str, LoadConfig], speech, repeats: int, mode: str,
                         on_turn=lambda: None) -> list[SideRun]:
    """Every (round, level, side) of `alternation`, each level run by runner.run_level (bounded by
    the config's level timeout; the whole comparison by plain's duration)."""
    deadline = time.monotonic() + configs["plain"].duration_s
    runs = []
    for rnd, n, side in alternation(configs["plain"].concurrency, repeats):
        if time.monotonic() >= deadline:
            break
        level = await run_level(configs[side], mode, n, speech, on_turn=on_turn, deadline_s=deadline)
        runs.append(SideRun(rnd, side, level))
    return runs


def first_audio(turns: list[TurnMeasurement]) -> dict:
    return percentiles([t.first_audio_ms for t in turns if not t.error and t.first_audio_ms is not None])


def _diff(a, b):
    return None if a is None or b is None else round(a - b, 1)


def differences(runs: list[SideRun]) -> list[dict]:
    """Per level: TLS - plain first audio at p50 and p95, pooled over rounds and per round (paired),
    with the per-round range and a verdict (`verdict`)."""
    out = []
    for n in sorted({r.level.concurrency for r in runs}):
        pooled = {side: first_audio([t for r in runs if (r.side, r.level.concurrency) == (side, n)
                                     for t in r.level.turns]) for side in SIDES}
        rounds = {}
        for r in runs:
            if r.level.concurrency == n:
                rounds.setdefault(r.round, {})[r.side] = first_audio(r.level.turns)
        row = {"concurrency": n}
        for q in ("p50", "p95"):
            per_round = [_diff(s["tls"][q], s["plain"][q]) for _, s in sorted(rounds.items()) if len(s) == 2]
            per_round = [d for d in per_round if d is not None]
            pooled_diff = _diff(pooled["tls"][q], pooled["plain"][q])
            row[q] = {
                "plain_ms": pooled["plain"][q], "tls_ms": pooled["tls"][q], "tls_minus_plain_ms": pooled_diff,
                "per_round_ms": per_round,
                "round_range_ms": [min(per_round), max(per_round)] if per_round else None,
                "plain_round_range_ms": _range([s["plain"][q] for s in rounds.values() if "plain" in s]),
                "verdict": verdict(pooled_diff, per_round),
            }
        out.append(row)
    return out


def verdict(pooled_diff: float | None, per_round: list[float]) -> str:
    """"above noise" when two or more rounds all differ in the pooled difference's direction; one
    round has no spread to judge by."""
    if pooled_diff is None or not per_round:
        return "no data"
    if len(per_round) < 2:
        return "one round: no spread"
    same_sign = pooled_diff != 0 and all(d != 0 and (d > 0) == (pooled_diff > 0) for d in per_round)
    return "above noise" if same_sign else "within noise"


def _range(values):
    values = [v for v in values if v is not None]
    return [min(values), max(values)] if values else None


def side_rows(runs: list[SideRun]) -> dict[str, list[dict]]:
    """The load test's summary rows (report.summarize) per side, over every round."""
    out = {}
    for side in SIDES:
        mine = [r.level for r in runs if r.side == side]
        failed = Counter()
        for lv in mine:
            failed[(lv.mode, lv.concurrency)] += sum(lv.failed.values())
        out[side] = summarize([t for lv in mine for t in lv.turns], +failed)
    return out


def errors(runs: list[SideRun]) -> dict[str, dict]:
    """Lost calls by status and failed turns by code, per side."""
    out = {side: Counter() for side in SIDES}
    for r in runs:
        out[r.side].update(r.level.failed)
        out[r.side].update(t.error.split(":")[0] for t in r.level.turns if t.error)
    return {side: dict(c) for side, c in out.items()}


def to_json(config: dict, runs: list[SideRun]) -> str:
    return json.dumps({
        "config": config,
        "order": [[r.round, r.level.concurrency, r.side] for r in runs],  # as run
        "difference": differences(runs),
        "sides": {side: {"summary": rows,
                         "rounds": [{"round": r.round, "concurrency": r.level.concurrency,
                                     "first_audio_ms": first_audio(r.level.turns), "failed": dict(r.level.failed),
                                     "wall_s": round(r.level.wall_s, 1), "client_loop_lag_ms": r.level.loop_lag_ms}
                                    for r in runs if r.side == side],
                         "turns": [asdict(t) for r in runs if r.side == side for t in r.level.turns]}
                  for side, rows in side_rows(runs).items()},
        "errors_by_code": errors(runs),
    }, indent=2)


def comparison_text(diffs: list[dict]) -> str:
    """The terminal table: pooled p50/p95 per side, TLS - plain pooled and its per-round range."""
    head = (f"{'calls':>5}  {'q':<4}{'plain ms':>9}{'tls ms':>9}{'tls-plain':>10}  {'per round (min..max)':<22}"
            f"{'plain rounds':<15}{'verdict'}")
    lines = [head, "-" * len(head)]
    for row in diffs:
        for q in ("p50", "p95"):
            d = row[q]
            rng = d["round_range_ms"]
            plain = d["plain_round_range_ms"]
            lines.append(
                f"{row['concurrency']:>5}  {q:<4}{_ms(d['plain_ms']):>9}{_ms(d['tls_ms']):>9}"
                f"{_ms(d['tls_minus_plain_ms']):>10}  "
                f"{(_ms(rng[0]) + '..' + _ms(rng[1])) if rng else '-':<22}"
                f"{(_ms(plain[0]) + '..' + _ms(plain[1])) if plain else '-':<15}"
                f"{d['verdict']}")
    return "\n".join(lines)


def difference_figure(diffs: list[dict]) -> str:
    """Base64 PNG: TLS - plain per level, each round a point, the pooled difference a bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [str(row["concurrency"]) for row in diffs]
    for k, (q, colour) in enumerate((("p50", "C0"), ("p95", "C1"))):
        xs = [i + (k - 0.5) * 0.35 for i in range(len(diffs))]
        ax.bar(xs, [row[q]["tls_minus_plain_ms"] or 0.0 for row in diffs], width=0.35, color=colour, alpha=0.5,
               label=f"{q} pooled")
        for x, row in zip(xs, diffs):
            ax.plot([x] * len(row[q]["per_round_ms"]), row[q]["per_round_ms"], "o", color=colour, markersize=4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(diffs)), labels)
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("first audio, TLS - plain (ms)")
    ax.set_title("Added first-audio latency of TLS (points: each round's paired difference)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    out = _png(fig)
    plt.close(fig)
    return out


def comparison_html(config: dict, runs: list[SideRun]) -> str:
    """The load test's latency-vs-concurrency plot with one line set per side, the difference plot,
    both tables."""
    from html import escape

    rows = side_rows(runs)
    labelled = [{**r, "mode": side} for side in SIDES for r in rows[side]]  # one colour per side
    turns = [replace(t, mode=r.side) for r in runs for t in r.level.turns]
    diffs = differences(runs)
    latency = plots(labelled, turns)["latency"]
    errs = "; ".join(f"{side}: " + (", ".join(f"{k} {v}" for k, v in e.items()) or "none")
                     for side, e in errors(runs).items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>TLS vs plaintext</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}img{{max-width:100%}}</style>
</head><body><h1>First-audio latency: TLS on every hop vs plaintext (same run)</h1>
<p>Two local clusters side by side; levels {escape(str(config.get('concurrency')))} run alternately (plain, TLS)
for {config.get('repeats')} rounds; mode {escape(str(config.get('mode')))}, codec {escape(str(config.get('codec')))}
{config.get('rate')} Hz, {config.get('turns')} turns per call, answers capped at
{config.get('max_new_tokens') or 'the server default'} tokens. Errors: {escape(errs)}</p>
<img src="data:image/png;base64,{latency}" alt="latency vs concurrency, both sides">
<img src="data:image/png;base64,{difference_figure(diffs)}" alt="TLS minus plain">
<h2>Difference</h2><pre>{escape(comparison_text(diffs))}</pre>
<p><b>tls-plain</b>: pooled over every round. <b>per round</b>: the range of each round's paired difference
(its two runs were back to back). <b>plain rounds</b>: how much plaintext alone moved from round to round.
<b>above noise</b>: every round's difference (two rounds or more) has the pooled difference's sign;
otherwise <b>within noise</b>.</p>
<h2>Plaintext</h2><pre>{escape(text_table(rows['plain']))}</pre>
<h2>TLS</h2><pre>{escape(text_table(rows['tls']))}</pre>
</body></html>"""
