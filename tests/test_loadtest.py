"""Load test: the report's pure functions, and a small smoke run against the in-process cluster."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from vitaserve.loadtest.report import (TurnMeasurement, html_report, percentiles, playout_starvation, summarize,
                                       text_table, to_json)
from vitaserve.loadtest.runner import LoadConfig, levels, run_load


def test_playout_starvation():
    # 1 s chunks arriving every second play without a stall; a chunk 0.5 s late stalls 0.5 s
    assert playout_starvation([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == (0.0, 0.0)
    assert playout_starvation([0.0, 1.5, 2.0], [1.0, 1.0, 1.0]) == (0.5, 0.5)
    # audio arriving faster than real time buffers up: no stall even with a late third chunk
    assert playout_starvation([0.0, 0.1, 2.5], [2.0, 1.0, 1.0]) == (0.0, 0.0)
    total, longest = playout_starvation([0.0, 2.0, 5.0], [1.0, 1.0, 1.0])
    assert (total, longest) == (3.0, 2.0)
    assert playout_starvation([], []) == (0.0, 0.0)


def test_percentiles():
    p = percentiles([float(x) for x in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.0, abs=0.1) and p["max"] == 100
    assert percentiles([])["p95"] is None


def turn(mode, n, first, stall=0.0, error=""):
    return TurnMeasurement(mode, n, 0, 1, first, first, 2.0, 1.0, 3, stall, stall, False, {}, error)


def test_summary_rows_per_mode_and_level():
    turns = [turn("boost", 1, 100.0), turn("boost", 1, 300.0), turn("boost", 4, 500.0, stall=0.2),
             turn("vanilla", 1, 900.0), turn("vanilla", 1, None, error="14: unavailable")]
    rows = summarize(turns, Counter({("vanilla", 4): 2}))
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    assert by[("boost", 1)]["first_audio_ms"]["p50"] == 200.0
    assert by[("boost", 4)]["starved_turns"] == 1
    assert by[("vanilla", 1)]["turn_errors"] == 1 and by[("vanilla", 4)]["calls_failed"] == 2
    assert "boost" in text_table(rows)
    assert len(levels(LoadConfig(target="x", ramp_slo_ms=100, max_concurrency=16))) == 5


def test_smoke_run_against_the_cluster(cluster, tmp_path):
    """4 calls x 2 turns on the tiny model: every turn answered, the report complete. Not timed."""
    from vitaserve.loadtest.speech import utterances

    cfg = LoadConfig(target=cluster.gateway(0), modes=("boost",), concurrency=(4,), turns=2, max_new_tokens=40,
                     turn_timeout_s=120, level_timeout_s=300)
    speech = utterances(8000, tmp_path / "speech")
    results = asyncio.run(run_load(cfg, speech))
    (level,) = results
    assert not level.failed, level.failed
    assert len(level.turns) == 8 and not any(t.error for t in level.turns)
    assert all(t.first_audio_ms and t.first_audio_ms > 0 and t.chunks > 0 for t in level.turns)
    rows = summarize(level.turns, Counter())
    report = json.loads(to_json({"target": cfg.target}, rows, level.turns, {}))
    assert report["summary"][0]["first_audio_ms"]["n"] == 8 and len(report["turns"]) == 8
    html = html_report({"target": cfg.target, "modes": ["boost"]}, rows, level.turns, {})
    assert html.count("data:image/png;base64,") == 2
