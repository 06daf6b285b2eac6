"""`vita-audio loadtest --local --compare-tls`: the alternation, the TLS - plain difference and its
spread, the report's shape; the whole comparison (two clusters, ~1 min even at 1 call) is a command,
run for loadtest/README.md, not here."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from tls_certs import TestCA
from vitaserve.devcluster.processes import free_port
from vitaserve.loadtest.report import TurnMeasurement
from vitaserve.loadtest.runner import LevelResult, LoadConfig
from vitaserve.loadtest.compare import (SideRun, alternation, comparison_html, comparison_text, differences,
                                            run_comparison, to_json)


def test_alternation_runs_each_level_on_both_sides_back_to_back_every_round():
    assert alternation((1, 16), 2, ("plain", "tls")) == [(1, 1, "plain"), (1, 1, "tls"), (1, 16, "plain"), (1, 16, "tls"),
                                       (2, 1, "plain"), (2, 1, "tls"), (2, 16, "plain"), (2, 16, "tls")]
    assert alternation((4,), 1, ("grpc", "twilio", "realtime")) == [(1, 4, "grpc"), (1, 4, "twilio"),
                                                                    (1, 4, "realtime")]


def level(n: int, first_ms: list[float | None], error: str = "", failed: Counter | None = None) -> LevelResult:
    turns = [TurnMeasurement("boost", n, i, 1, ms, ms, 2.0, 1.0, 3, 0.0, 0.0, False, {}, error if ms is None else "")
             for i, ms in enumerate(first_ms)]
    return LevelResult("boost", n, turns=turns, failed=failed or Counter(), wall_s=1.0)


def runs_of(table: dict[tuple[int, int, str], list[float | None]]) -> list[SideRun]:
    return [SideRun(rnd, side, level(n, ms)) for (rnd, n, side), ms in table.items()]


def test_difference_is_tls_minus_plain_pooled_and_per_round_with_a_verdict():
    # 1 call: TLS 20 ms slower in each of 3 rounds while plain itself moves 100 ms between rounds:
    # the paired differences are all positive, so above noise although the rounds' spread is larger
    runs = runs_of({(1, 1, "plain"): [800.0], (1, 1, "tls"): [820.0], (2, 1, "plain"): [900.0],
                    (2, 1, "tls"): [920.0], (3, 1, "plain"): [850.0], (3, 1, "tls"): [870.0],
                    # 16 calls: one round TLS is faster, one slower: within noise
                    (1, 16, "plain"): [1000.0, 2000.0], (1, 16, "tls"): [1100.0, 2100.0],
                    (2, 16, "plain"): [1200.0, 2200.0], (2, 16, "tls"): [1150.0, 2150.0]})
    one, sixteen = differences(runs)
    assert one["concurrency"] == 1 and sixteen["concurrency"] == 16
    p50 = one["p50"]
    assert (one["side"], one["baseline"]) == ("tls", "plain")
    assert (p50["baseline_ms"], p50["side_ms"], p50["minus_baseline_ms"]) == (850.0, 870.0, 20.0)
    assert p50["per_round_ms"] == [20.0, 20.0, 20.0] and p50["round_range_ms"] == [20.0, 20.0]
    assert p50["baseline_round_range_ms"] == [800.0, 900.0] and p50["verdict"] == "above noise"
    assert sixteen["p50"]["per_round_ms"] == [100.0, -50.0] and sixteen["p50"]["round_range_ms"] == [-50.0, 100.0]
    assert sixteen["p50"]["verdict"] == "within noise"
    assert sixteen["p95"]["minus_baseline_ms"] == pytest.approx(
        sixteen["p95"]["side_ms"] - sixteen["p95"]["baseline_ms"], abs=0.1)
    text = comparison_text([one, sixteen])
    assert "above noise" in text and "within noise" in text and "-50..100" in text


def test_one_round_has_no_spread_and_failed_turns_are_left_out():
    runs = [SideRun(1, "plain", level(1, [500.0, None], error="14: unavailable")), SideRun(1, "tls", level(1, [530.0]))]
    (row,) = differences(runs)
    assert row["p50"]["minus_baseline_ms"] == 30.0 and row["p50"]["verdict"] == "one round: no spread"
    # a side with no answered turn has no difference, not a zero one
    (empty,) = differences([SideRun(1, "plain", level(1, [None], error="14: x")), SideRun(1, "tls", level(1, [5.0]))])
    assert empty["p50"]["minus_baseline_ms"] is None and empty["p50"]["verdict"] == "no data"


def test_report_has_both_sides_every_round_the_difference_and_two_plots():
    runs = runs_of({(1, 1, "plain"): [800.0], (1, 1, "tls"): [830.0], (2, 1, "plain"): [810.0],
                    (2, 1, "tls"): [850.0]})
    runs.append(SideRun(2, "tls", level(4, [900.0], failed=Counter({"UNAVAILABLE": 1}))))
    config = {"concurrency": [1], "repeats": 2, "mode": "boost", "codec": "mulaw", "rate": 8000, "turns": 1}
    report = json.loads(to_json(config, runs))
    assert set(report["sides"]) == {"plain", "tls"} and report["difference"][0]["p50"]["minus_baseline_ms"] == 35.0
    assert report["order"][:2] == [[1, 1, "plain"], [1, 1, "tls"]]
    assert [r["round"] for r in report["sides"]["tls"]["rounds"]] == [1, 2, 2]
    assert len(report["sides"]["plain"]["turns"]) == 2 and report["errors_by_code"]["tls"] == {"UNAVAILABLE": 1}
    assert {r["concurrency"] for r in report["sides"]["tls"]["summary"]} == {1, 4}
    html = comparison_html(config, runs, "TLS vs plain", "Two clusters.")
    assert html.count("data:image/png;base64,") == 2 and "UNAVAILABLE 1" in html


def test_comparison_alternates_real_calls_and_counts_what_failed(tmp_path):
    """Against ports nobody serves (plaintext, and TLS trusting a test CA): every call fails by status
    code, and the runs come back in the alternation's order, each on its own side."""
    ca = TestCA(tmp_path / "ca")
    base = LoadConfig(target="x", concurrency=(1, 2), turns=1, turn_timeout_s=5, level_timeout_s=30)
    configs = {"plain": replace(base, target=f"127.0.0.1:{free_port()}"),
               "tls": replace(base, target=f"127.0.0.1:{free_port()}", tls_ca=str(ca.file))}
    runs = asyncio.run(run_comparison(configs, {side: [np.zeros(800, np.float32)] for side in configs}, repeats=2,
                                      mode="boost"))
    assert [(r.round, r.level.concurrency, r.side) for r in runs] == alternation((1, 2), 2, ("plain", "tls"))
    assert all(r.level.failed == Counter({"UNAVAILABLE": r.level.concurrency}) for r in runs)


@pytest.mark.parametrize("argv, words", [
    (["--target", "x:1", "--compare-tls"], "needs --local"),
    (["--local", "--compare-tls", "--tls"], "drop --tls"),
    (["--local", "--compare-tls", "--chaos"], "drop --chaos"),
    (["--local", "--compare-tls", "--modes", "boost,turbo"], "one mode"),
    (["--local", "--compare-tls", "--repeats", "0"], "--repeats must be >= 1"),
    (["--local", "--protocol", "grpc,sip"], "--protocol takes grpc, twilio, realtime, audiosocket"),
    (["--target", "x:1", "--protocol", "grpc,twilio"], "add --local"),
    (["--local", "--protocol", "twilio,realtime", "--tls"], "drop --tls"),
    (["--local", "--protocol", "twilio", "--chaos"], "drop --chaos"),
    (["--local", "--protocol", "grpc,twilio", "--modes", "boost,turbo"], "one mode"),
    (["--local", "--protocol", "grpc,twilio", "--repeats", "0"], "--repeats must be >= 1")])
def test_the_command_refuses_what_cannot_be_compared(argv, words, capsys):
    from vitaserve.cli.main import main

    assert main(["loadtest", *argv]) != 0
    assert words in capsys.readouterr().err


def test_a_load_config_names_a_protocol_the_gateway_speaks_and_each_adapter_its_own_audio():
    from vitaserve.loadtest.protocols import PROTOCOLS, audio_of
    from vitaserve.loadtest.runner import LoadConfigError

    assert LoadConfig(target="ws://h:1/twilio", protocol="twilio").protocol == "twilio"
    with pytest.raises(LoadConfigError, match="protocol must be one of"):
        LoadConfig(target="x", protocol="sip")
    with pytest.raises(LoadConfigError, match="--tls-ca is for gRPC"):
        LoadConfig(target="x", protocol="realtime", tls_ca="ca.pem")
    assert [audio_of(p, "pcm16", 16000) for p in PROTOCOLS] == [
        ("pcm16", 16000), ("mulaw", 8000), ("pcm16", 24000), ("pcm16", 8000)]
