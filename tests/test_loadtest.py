"""Load test: the report's pure functions, and a small smoke run against the in-process cluster."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import numpy as np
import pytest

from vitaserve.devcluster.processes import free_port
from vitaserve.loadtest.report import (TurnMeasurement, from_json, html_report, percentiles, playout_starvation,
                                       summarize, text_table, to_json)
from vitaserve.loadtest.runner import (LevelResult, LoadConfig, LoadConfigError, levels, over_objective, run_level,
                                       run_load)


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
    assert by[("boost", 1)]["server_first_audio_ms"]["n"] == 0  # no TurnTimings in these turns
    table = text_table(rows)
    assert "boost" in table and "1/1" in table  # boost@4: one starved turn of one
    assert len(levels(LoadConfig(target="x", ramp_slo_ms=100, max_concurrency=16))) == 5


def test_ramp_stops_over_the_objective_or_on_a_lost_call():
    fast = LevelResult("boost", 4, turns=[turn("boost", 4, 100.0)] * 20)
    assert not over_objective(fast, slo_ms=500)
    assert over_objective(LevelResult("boost", 4, turns=[turn("boost", 4, 900.0)] * 20), slo_ms=500)
    assert over_objective(LevelResult("boost", 4, turns=fast.turns, failed=Counter({"UNAVAILABLE": 1})), 500)
    assert over_objective(LevelResult("boost", 4), slo_ms=500)  # nothing answered at all


@pytest.mark.parametrize("kwargs, words", [
    ({"turns": 0}, "turns"), ({"concurrency": (0, 4)}, "concurrency"), ({"barge_in_prob": 1.5}, "barge-in"),
    ({"codec": "opus"}, "codec"), ({"rate": 44100}, "not 44100"), ({"modes": ()}, "modes"),
    ({"duration_s": 0}, "positive"), ({"ramp_slo_ms": -1}, "objective")])
def test_bad_settings_say_what_is_wrong(kwargs, words):
    with pytest.raises(LoadConfigError, match=words):
        LoadConfig(target="x", **kwargs)


def test_unreachable_gateway_and_deadline_are_counted_not_raised():
    """Calls to a port nobody listens on fail by status code; a spent deadline cuts every call."""
    speech = [np.zeros(800, np.float32)]
    cfg = LoadConfig(target=f"127.0.0.1:{free_port()}", concurrency=(2,), turns=1, turn_timeout_s=5)
    level = asyncio.run(run_level(cfg, "boost", 2, speech))
    assert level.failed == Counter({"UNAVAILABLE": 2}) and level.turns == []
    cut = asyncio.run(run_level(cfg, "boost", 3, speech, deadline_s=time.monotonic()))
    assert cut.failed == Counter({"LEVEL_TIMEOUT": 3})
    assert asyncio.run(run_load(LoadConfig(target=cfg.target, duration_s=1e-9), speech)) == []


def test_smoke_run_against_the_cluster(cluster, tmp_path):
    """4 calls x 2 turns on the tiny model, some callers barging in: every turn answered, the report
    complete. Not timed."""
    from vitaserve.loadtest.speech import utterances

    cfg = LoadConfig(target=cluster.gateway(0), modes=("boost",), concurrency=(4,), turns=2, max_new_tokens=40,
                     turn_timeout_s=120, level_timeout_s=300, barge_in_prob=0.5, seed=1)
    speech = utterances(8000, tmp_path / "speech")
    results = asyncio.run(run_load(cfg, speech))
    (level,) = results
    assert not level.failed, level.failed
    assert len(level.turns) == 8 and not any(t.error for t in level.turns)
    assert all(t.first_audio_ms and t.first_audio_ms > 0 and t.chunks > 0 for t in level.turns)
    assert all(len(t.chunk_arrivals_ms) == t.chunks for t in level.turns)
    assert level.loop_lag_ms["n"] > 0 and level.wall_s > 0
    rows = summarize(level.turns, Counter(), {("boost", 4): level.loop_lag_ms})
    text = to_json({"target": cfg.target}, rows, level.turns, {})
    report = json.loads(text)
    assert from_json(text)[2] == level.turns  # every measurement survives the file
    assert report["summary"][0]["first_audio_ms"]["n"] == 8 and len(report["turns"]) == 8
    assert report["summary"][0]["client_loop_lag_ms"]["n"] > 0
    # the seed makes a caller talk over its first answer: that turn is interrupted, the others finish
    assert any(t["interrupted"] for t in report["turns"])
    assert all({"first_audio_ms", "total_ms"} <= set(t["server"]) for t in report["turns"] if not t["interrupted"])
    html = html_report({"target": cfg.target, "modes": ["boost"]}, rows, level.turns, {})
    assert html.count("data:image/png;base64,") == 2
