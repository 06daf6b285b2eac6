"""`vita-audio bench lm|engine` run end to end on the tiny checkpoint and write the fields their readers
use, with the machine and commit beside the figures. No timing is asserted: figures belong to
benchmarks; only the structure, and facts that hold on any machine, are checked."""

from __future__ import annotations

import json

import pytest

from vitaserve.cli.main import main

PROVENANCE = ("cpu_model", "cpu_count", "torch_threads", "torch", "commit", "device")


def _run(tmp_path, argv: list[str]) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_lm_writes_figures_with_provenance(tiny_lm_dir, tmp_path, capsys):
    result = _run(tmp_path, ["lm", "--lm", str(tiny_lm_dir), "--modes", "boost", "--prompt-len", "8",
                             "--max-new-tokens", "16", "--repeats", "1", "--max-len", "64"])
    for key in PROVENANCE:
        assert key in result, key
    assert result["cpu_model"] and result["torch_threads"] >= 1
    row = result["modes"][0]
    assert row["mode"] == "boost" and row["first_chunk_ms"] > 0 and row["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert result["cpu_model"] in printed and "first_chunk_ms" in printed  # the table names its machine


def test_bench_engine_together(tiny_lm_dir, tmp_path):
    result = _run(tmp_path, ["engine", "--lm", str(tiny_lm_dir), "--concurrency", "3", "--prompt-len", "8",
                             "--max-new-tokens", "16", "--max-len", "64"])
    for key in (*PROVENANCE, "tokens_per_s", "first_chunk_ms_p50", "first_chunk_ms_p95", "first_chunk_ms_max",
                "lone_first_chunk_ms", "lone_tokens_per_s", "first_chunk_max_over_lone", "per_call_tokens_per_s_min",
                "every_call_real_time"):
        assert key in result, key
    assert result["arrival"] == "together" and result["concurrency"] == 3
    assert result["first_chunk_ms_p50"] <= result["first_chunk_ms_max"]
    assert result["first_chunk_floor_over_lone"] == round(3 * result["lone_tokens_per_s"] / result["tokens_per_s"], 2)


def test_bench_engine_samples_as_the_checkpoint_says_with_a_seed_per_call(tiny_lm_dir, tmp_path):
    from vitaserve.generator.benchmark import call_sampling
    from vitaserve.generator.language_model import LanguageModel

    result = _run(tmp_path, ["engine", "--lm", str(tiny_lm_dir), "--concurrency", "2", "--prompt-len", "8",
                             "--max-new-tokens", "16", "--max-len", "64", "--sampling", "checkpoint"])
    assert result["sampling"] == "checkpoint" and result["tokens_per_s"] > 0
    lm = LanguageModel.from_folder(tiny_lm_dir, num_slots=1, max_len=64)
    first, second = call_sampling(lm, "checkpoint", 0), call_sampling(lm, "checkpoint", 1)
    assert first.do_sample and (first.top_k, first.top_p) == (lm.defaults.top_k, lm.defaults.top_p)
    assert (first.seed, second.seed) == (0, 1)
    assert not call_sampling(lm, "greedy", 0).do_sample


def test_bench_engine_staggered_reports_joiners_apart(tiny_lm_dir, tmp_path):
    result = _run(tmp_path, ["engine", "--lm", str(tiny_lm_dir), "--concurrency", "3", "--arrival", "staggered",
                             "--joiners", "2", "--max-gap-steps", "3", "--prompt-len", "8",
                             "--max-new-tokens", "16", "--max-len", "256"])
    for key in (*PROVENANCE, "lone_first_chunk_ms", "joining_first_chunk_ms_p50", "joining_first_chunk_ms_max",
                "running_first_chunk_ms_p50", "running_tokens_per_s_min", "running_audio_tokens_per_s_min",
                "running_keep_real_time", "running_longest_gap_ms", "joining_first_chunk_p50_over_lone",
                "tokens_per_s", "join_period_s"):
        assert key in result, key
    assert result["arrival"] == "staggered"
    assert len(result["joining_first_chunk_ms"]) == 2  # one first chunk per joiner, none of a running call
    assert result["real_time_tokens_per_s"] == 12.5
    assert result["real_time_need_over_throughput"] == round(2 * 12.5 / result["tokens_per_s"], 2)
    assert result["running_keep_real_time"] == (result["running_tokens_per_s_min"] >= 12.5)
    # running calls emit one token per step and keep running through the join period
    assert result["running_tokens_per_s_min"] > 0


def test_bench_engine_refuses_a_batch_over_its_slots(tiny_lm_dir, capsys):
    from vitaserve.generator.benchmark import bench_engine
    from vitaserve.generator.language_model import LanguageModel

    lm = LanguageModel.from_folder(tiny_lm_dir, num_slots=2, max_len=64)
    with pytest.raises(ValueError, match="exceeds the engine's 2 cache slots"):
        bench_engine(lm, 3, "boost", prompt_len=8, max_new_tokens=16)
    with pytest.raises(ValueError, match="arrival"):
        bench_engine(lm, 2, "boost", prompt_len=8, max_new_tokens=16, arrival="later")
    with pytest.raises(ValueError, match="sampling must be one of greedy, checkpoint"):
        bench_engine(lm, 2, "boost", prompt_len=8, max_new_tokens=16, sampling="nucleus")
    assert main(["bench", "engine", "--lm", str(tiny_lm_dir), "--concurrency", "1", "--arrival", "staggered",
                 "--max-len", "64", "--prompt-len", "8", "--max-new-tokens", "16"]) == 2
    assert "staggered arrival needs concurrency >= 2" in capsys.readouterr().err
