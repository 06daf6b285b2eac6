"""What one way of calling adds to first-audio latency against another: the same levels, same run.

A side is one way of placing the calls: plaintext vs TLS on every hop (`--compare-tls`, two local
clusters), or gRPC vs each telephony adapter of one gateway (`--protocol grpc,twilio,...`). The first
side is the baseline. Each concurrency level runs on every side back to back (grpc, twilio, ...,
grpc, twilio, ...) for several rounds, so a slow minute of a shared machine falls on every side
instead of on one. Per level and side: first-audio percentiles over every round (the levels' own
`summarize` rows), and each round's p50/p95. Each side's difference from the baseline is given
pooled and per round (the paired difference of the round's runs, which ran back to back): when the
per-round differences do not all have the same sign, the difference is within the noise.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

from vitaserve.loadtest.report import (TurnMeasurement, _ms, _png, _pyplot, percentiles, plots, summarize,
                                       text_table)
from vitaserve.loadtest.runner import LevelResult, LoadConfig, run_level


def alternation(concurrency: tuple[int, ...], repeats: int, sides: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """(round, level, side) in run order: every round runs each level on every side back to back,
    the baseline (sides[0]) first."""
    return [(r, n, side) for r in range(1, repeats + 1) for n in concurrency for side in sides]


def sides_of(runs: list["SideRun"]) -> list[str]:
    """The sides in run order; the first is the baseline."""
    return list(dict.fromkeys(r.side for r in runs))


@dataclass
class SideRun:
    """One level on one side in one round."""
    round: int
    side: str
    level: LevelResult


async def run_comparison(configs: dict[str, LoadConfig], speech: dict[str, list], repeats: int, mode: str,
                         on_turn=lambda: None) -> list[SideRun]:
    """Every (round, level, side) of `alternation` (sides in the order of `configs`, the baseline
    first), each level run by runner.run_level (bounded by the config's level timeout; the whole
    comparison by the baseline's duration)."""
    base = next(iter(configs.values()))
    deadline = time.monotonic() + base.duration_s
    runs = []
    for rnd, n, side in alternation(base.concurrency, repeats, tuple(configs)):
        if time.monotonic() >= deadline:
            break
        level = await run_level(configs[side], mode, n, speech[side], on_turn=on_turn, deadline_s=deadline)
        runs.append(SideRun(rnd, side, level))
    return runs


def first_audio(turns: list[TurnMeasurement]) -> dict:
    return percentiles([t.first_audio_ms for t in turns if not t.error and t.first_audio_ms is not None])


def _diff(a, b):
    return None if a is None or b is None else round(a - b, 1)


def differences(runs: list[SideRun]) -> list[dict]:
    """Per level and side other than the baseline: side - baseline first audio at p50 and p95,
    pooled over rounds and per round (paired), with the per-round range and a verdict (`verdict`)."""
    sides = sides_of(runs)
    base = sides[0] if sides else ""
    out = []
    for n in sorted({r.level.concurrency for r in runs}):
        pooled = {side: first_audio([t for r in runs if (r.side, r.level.concurrency) == (side, n)
                                     for t in r.level.turns]) for side in sides}
        rounds = {}
        for r in runs:
            if r.level.concurrency == n:
                rounds.setdefault(r.round, {})[r.side] = first_audio(r.level.turns)
        for side in sides[1:]:
            row = {"concurrency": n, "side": side, "baseline": base}
            for q in ("p50", "p95"):
                per_round = [_diff(s[side][q], s[base][q]) for _, s in sorted(rounds.items()) if side in s and base in s]
                per_round = [d for d in per_round if d is not None]
                pooled_diff = _diff(pooled[side][q], pooled[base][q])
                row[q] = {
                    "baseline_ms": pooled[base][q], "side_ms": pooled[side][q], "minus_baseline_ms": pooled_diff,
                    "per_round_ms": per_round,
                    "round_range_ms": [min(per_round), max(per_round)] if per_round else None,
                    "baseline_round_range_ms": _range([s[base][q] for s in rounds.values() if base in s]),
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
    for side in sides_of(runs):
        mine = [r.level for r in runs if r.side == side]
        failed = Counter()
        for lv in mine:
            failed[(lv.mode, lv.concurrency)] += sum(lv.failed.values())
        out[side] = summarize([t for lv in mine for t in lv.turns], +failed)
    return out


def errors(runs: list[SideRun]) -> dict[str, dict]:
    """Lost calls by status and failed turns by code, per side."""
    out = {side: Counter() for side in sides_of(runs)}
    for r in runs:
        out[r.side].update(r.level.failed)
        out[r.side].update(t.error.split(":")[0] for t in r.level.turns if t.error)
    return {side: dict(c) for side, c in out.items()}


def to_json(config: dict, runs: list[SideRun], extra: dict | None = None) -> str:
    return json.dumps({
        **(extra or {}),
        "config": config,
        "baseline": (sides_of(runs) or [None])[0],
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
    """The terminal table: pooled p50/p95 of the baseline and the side, their difference pooled and
    its per-round range, the baseline's own round-to-round range, the verdict."""
    base = diffs[0]["baseline"] if diffs else "baseline"
    head = (f"{'calls':>5}  {'side':<12}{'q':<4}{base + ' ms':>10}{'side ms':>9}{'side-' + base:>12}  "
            f"{'per round (min..max)':<22}{base + ' rounds':<16}{'verdict'}")
    lines = [head, "-" * len(head)]
    for row in diffs:
        for q in ("p50", "p95"):
            d = row[q]
            rng = d["round_range_ms"]
            own = d["baseline_round_range_ms"]
            lines.append(
                f"{row['concurrency']:>5}  {row['side']:<12}{q:<4}{_ms(d['baseline_ms']):>10}{_ms(d['side_ms']):>9}"
                f"{_ms(d['minus_baseline_ms']):>12}  "
                f"{(_ms(rng[0]) + '..' + _ms(rng[1])) if rng else '-':<22}"
                f"{(_ms(own[0]) + '..' + _ms(own[1])) if own else '-':<16}"
                f"{d['verdict']}")
    return "\n".join(lines)


def difference_figure(diffs: list[dict]) -> str:
    """Base64 PNG: side - baseline per level and side, each round a point, the pooled difference a bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(diffs)), 3.5))
    labels = [f"{row['concurrency']}\n{row['side']}" for row in diffs]
    for k, (q, colour) in enumerate((("p50", "C0"), ("p95", "C1"))):
        xs = [i + (k - 0.5) * 0.35 for i in range(len(diffs))]
        ax.bar(xs, [row[q]["minus_baseline_ms"] or 0.0 for row in diffs], width=0.35, color=colour, alpha=0.5,
               label=f"{q} pooled")
        for x, row in zip(xs, diffs):
            ax.plot([x] * len(row[q]["per_round_ms"]), row[q]["per_round_ms"], "o", color=colour, markersize=4)
    base = diffs[0]["baseline"] if diffs else "baseline"
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(diffs)), labels)
    ax.set_xlabel("concurrent calls, side")
    ax.set_ylabel(f"first audio, side - {base} (ms)")
    ax.set_title(f"Added first-audio latency against {base} (points: each round's paired difference)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    out = _png(fig)
    plt.close(fig)
    return out


def comparison_html(config: dict, runs: list[SideRun], title: str, about: str, extra_html: str = "") -> str:
    """The load test's latency-vs-concurrency plot with one line set per side, the difference plot,
    every side's table. `about`: one paragraph saying what the sides are (HTML-escaped here)."""
    from html import escape

    rows = side_rows(runs)
    sides = sides_of(runs)
    base = sides[0] if sides else "baseline"
    labelled = [{**r, "mode": side} for side in sides for r in rows[side]]  # one colour per side
    turns = [replace(t, mode=r.side) for r in runs for t in r.level.turns]
    diffs = differences(runs)
    latency = plots(labelled, turns)["latency"]
    errs = "; ".join(f"{side}: " + (", ".join(f"{k} {v}" for k, v in e.items()) or "none")
                     for side, e in errors(runs).items())
    tables = "".join(f"<h2>{escape(side)}</h2><pre>{escape(text_table(rows[side]))}</pre>" for side in sides)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}img{{max-width:100%}}</style>
</head><body><h1>{escape(title)}</h1>
<p>{escape(about)} Levels {escape(str(config.get('concurrency')))} run on every side back to back
({escape(', '.join(sides))}) for {config.get('repeats')} rounds; mode {escape(str(config.get('mode')))},
{config.get('turns')} turns per call, answers capped at {config.get('max_new_tokens') or 'the server default'}
tokens. Errors: {escape(errs)}</p>
<img src="data:image/png;base64,{latency}" alt="latency vs concurrency, every side">
<img src="data:image/png;base64,{difference_figure(diffs)}" alt="each side minus {escape(base)}">
<h2>Difference</h2><pre>{escape(comparison_text(diffs))}</pre>
<p><b>side-{escape(base)}</b>: pooled over every round. <b>per round</b>: the range of each round's paired
difference (its runs were back to back). <b>{escape(base)} rounds</b>: how much the baseline alone moved from
round to round. <b>above noise</b>: every round's difference (two rounds or more) has the pooled difference's
sign; otherwise <b>within noise</b>.</p>{extra_html}
{tables}
</body></html>"""
