"""Pure functions from measured turns to the report: percentiles, starvation, tables, JSON, HTML."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from vitaserve.common.percentiles import percentile

PERCENTILES = (50, 90, 95, 99)


@dataclass
class TurnMeasurement:
    mode: str
    concurrency: int
    call: int
    turn: int
    first_audio_ms: float | None
    first_text_ms: float | None
    duration_s: float
    audio_s: float
    chunks: int
    starvation_s: float  # total time playback would have waited for audio after it started
    max_gap_s: float
    interrupted: bool
    server: dict = field(default_factory=dict)  # the server's TurnTimings, ms
    error: str = ""
    chunk_arrivals_ms: list[float] = field(default_factory=list)  # after the utterance ended
    text_tokens: int = 0
    audio_tokens: int = 0


def playout_starvation(arrivals: list[float], durations: list[float]) -> tuple[float, float]:
    """(total stall, longest stall) in s of a player that starts with the first chunk and plays
    chunks back to back: a chunk arriving after the audio before it ran out is a stall."""
    if not arrivals:
        return 0.0, 0.0
    end = arrivals[0] + durations[0]
    total = longest = 0.0
    for arrival, duration in zip(arrivals[1:], durations[1:]):
        gap = arrival - end
        if gap > 0:
            total += gap
            longest = max(longest, gap)
        end = max(end, arrival) + duration
    return total, longest


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {**{f"p{q}": None for q in PERCENTILES}, "max": None, "n": 0}
    arr = np.asarray(values, dtype=float)
    return {**{f"p{q}": round(percentile(arr, q), 1) for q in PERCENTILES},
            "max": round(float(arr.max()), 1), "n": int(arr.size)}


def summarize(turns: list[TurnMeasurement], calls_failed: Counter, loop_lag: dict | None = None) -> list[dict]:
    """One row per (mode, concurrency). loop_lag: (mode, concurrency) -> the client's loop-lag
    percentiles, so a reader can tell a slow server from a starved client."""
    rows = []
    for key in sorted({(t.mode, t.concurrency) for t in turns} | set(calls_failed)):
        mode, conc = key
        group = [t for t in turns if (t.mode, t.concurrency) == key]
        ok = [t for t in group if not t.error]
        server = [t.server.get("first_audio_ms") for t in ok]
        rows.append({
            "mode": mode, "concurrency": conc, "turns": len(group), "turn_errors": len(group) - len(ok),
            "calls_failed": calls_failed.get(key, 0),
            "first_audio_ms": percentiles([t.first_audio_ms for t in ok if t.first_audio_ms is not None]),
            "first_text_ms": percentiles([t.first_text_ms for t in ok if t.first_text_ms is not None]),
            "server_first_audio_ms": percentiles([v for v in server if v]),
            "turn_s": percentiles([t.duration_s for t in ok]),
            "starved_turns": sum(t.starvation_s > 0 for t in ok),
            "starvation_s": percentiles([t.starvation_s for t in ok]),
            "max_gap_s": percentiles([t.max_gap_s for t in ok]),
            "interrupted": sum(t.interrupted for t in group),
            "client_loop_lag_ms": (loop_lag or {}).get(key, {}),
        })
    return rows


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def text_table(rows: list[dict]) -> str:
    """The terminal summary: first audio in full, the rest at p50/p95."""
    head = (f"{'mode':<9}{'calls':>6}{'turns':>6}{'err':>5}  {'first audio ms p50/p90/p95/p99/max':<36}"
            f"{'text p50/p95':>14}{'server p50':>11}{'starved':>9}{'gap p95 s':>10}{'lag p99':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        fa, ft = r["first_audio_ms"], r["first_text_ms"]
        cells = "/".join(_ms(fa[k]) for k in ("p50", "p90", "p95", "p99", "max"))
        gap = r.get("max_gap_s", {}).get("p95")
        lines.append(
            f"{r['mode']:<9}{r['concurrency']:>6}{r['turns']:>6}{r['turn_errors'] + r['calls_failed']:>5}  {cells:<36}"
            f"{_ms(ft['p50']) + '/' + _ms(ft['p95']):>14}{_ms(r.get('server_first_audio_ms', {}).get('p50')):>11}"
            f"{str(r['starved_turns']) + '/' + str(r['turns']):>9}{'-' if gap is None else f'{gap:.2f}':>10}"
            f"{_ms(r.get('client_loop_lag_ms', {}).get('p99')):>9}")
    return "\n".join(lines)


def to_json(config: dict, rows: list[dict], turns: list[TurnMeasurement], errors: dict) -> str:
    return json.dumps({"config": config, "summary": rows, "errors_by_code": errors,
                       "turns": [asdict(t) for t in turns]}, indent=2)


def from_json(text: str) -> tuple[dict, list[dict], list[TurnMeasurement], dict]:
    """(config, rows, turns, errors) of a report.json, e.g. to redraw its HTML."""
    data = json.loads(text)
    return data["config"], data["summary"], [TurnMeasurement(**t) for t in data["turns"]], data["errors_by_code"]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(rows: list[dict], turns: list[TurnMeasurement]) -> dict[str, str]:
    """Base64 PNGs: first-audio percentiles vs concurrency per mode; stalls per turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, mode in enumerate(sorted({r["mode"] for r in rows})):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        for q, style in (("p50", "-o"), ("p95", "--s"), ("p99", ":^")):  # one colour per mode
            ys = [r["first_audio_ms"][q] if r["first_audio_ms"][q] is not None else np.nan for r in mine]
            ax.plot(xs, ys, style, color=f"C{i}", label=f"{mode} {q}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["concurrency"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("first audio (ms after the caller stopped)")
    ax.set_title("First-audio latency vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out["latency"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [f"{r['mode']}@{r['concurrency']}" for r in rows]
    stalls = [[t.starvation_s for t in turns
               if (t.mode, t.concurrency) == (r["mode"], r["concurrency"]) and not t.error] for r in rows]
    ax.boxplot([s or [0.0] for s in stalls], tick_labels=labels)
    ax.set_ylabel("playback stall per turn (s)")
    ax.set_title("Starvation: audio arriving slower than real time")
    ax.tick_params(axis="x", labelrotation=45)
    out["starvation"] = _png(fig)
    plt.close(fig)
    return out


def html_report(config: dict, rows: list[dict], turns: list[TurnMeasurement], errors: dict) -> str:
    """One self-contained page: the setup, two plots (PNG, inline) and the summary table."""
    from html import escape

    images = plots(rows, turns)
    errs = ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"
    end = ("the caller's END_OF_UTTERANCE (push-to-talk)" if config.get("push_to_talk")
           else "the last voiced frame of the caller's utterance (the server's VAD still has to hear the silence)")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>vitaserve load test</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}img{{max-width:100%}}</style>
</head><body><h1>Load test: first-audio latency under concurrency</h1>
<p>target <code>{escape(str(config.get('target')))}</code>, codec {escape(str(config.get('codec')))}
{config.get('rate')} Hz, {config.get('turns')} turns per call, barge-in probability {config.get('barge_in_prob', 0)},
answers capped at {config.get('max_new_tokens') or 'the server default'} tokens,
modes {escape(', '.join(config.get('modes', [])))}; errors by code: {escape(errs)}</p>
<img src="data:image/png;base64,{images['latency']}" alt="latency vs concurrency">
<img src="data:image/png;base64,{images['starvation']}" alt="starvation">
<h2>Summary</h2><pre>{escape(text_table(rows))}</pre>
<p><b>first audio</b>: from {end} to the first audio chunk received, measured at the caller.
<b>text</b>: the same for the first text. <b>server</b>: the server's own first-audio figure (TurnTimings).
<b>starved</b>: turns whose audio arrived slower than it plays (a player starting at the first chunk
would stall); <b>gap</b>: the longest such stall. <b>lag</b>: the load generator's own event-loop lag
(ms); when it is large the client, not the server, limits the figures.</p>
</body></html>"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rss_figure(t_s: list[float], rss_kb: list[dict[str, int]], warmup_s: float) -> str:
    """Base64 PNG: resident memory (MiB) of every process over the soak, the warm-up's end marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in sorted({n for sample in rss_kb for n in sample}):
        pairs = [(t, s[name] / 1024) for t, s in zip(t_s, rss_kb) if name in s]
        ax.plot([p[0] / 60 for p in pairs], [p[1] for p in pairs], label=name, linewidth=1.2)
    ax.axvline(warmup_s / 60, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
    ax.set_yscale("log")
    ax.set_xlabel("minutes since the calls began")
    ax.set_ylabel("resident memory (MiB, log scale)")
    ax.set_title("Resident memory of every process during the soak")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    out = _png(fig)
    plt.close(fig)
    return out


def chaos_figure(turns: list[dict], faults: list[dict]) -> str:
    """Base64 PNG: every turn on a time line (completed, failed), each fault's window shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    components = sorted({f["component"] for f in faults})
    for i, f in enumerate(faults):
        end = f["recovered_at_s"] if f["recovered_at_s"] is not None else f["at_s"] + 1
        ax.axvspan(f["at_s"], end, color=f"C{components.index(f['component']) + 2}", alpha=0.25,
                   label=f["component"] if f["component"] not in [g["component"] for g in faults[:i]] else None)
        ax.text(f["at_s"], 1.02, f["fault"], transform=ax.get_xaxis_transform(), fontsize=6, rotation=90,
                va="bottom")
    calls = sorted({t["call"] for t in turns})
    for ok, colour, label in ((True, "C0", "turn completed"), (False, "C3", "turn failed")):
        mine = [t for t in turns if (not t["error"]) == ok]
        ax.scatter([t["ended_at_s"] for t in mine], [calls.index(t["call"]) for t in mine], s=12, color=colour,
                   marker="o" if ok else "x", label=label, zorder=3)
    ax.set_xlabel("seconds since the calls began")
    ax.set_ylabel("call")
    ax.set_title("Turns under chaos: faults shaded from injection to recovery", pad=30)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    out = _png(fig)
    plt.close(fig)
    return out
