"""The step policy's decisions (generator/scheduler.py), on plain call states."""

from __future__ import annotations

import pytest

from vitaserve.generator.scheduler import CallState, SchedulerConfig, decide

CFG = SchedulerConfig(step_tokens=64, min_chunk=8, lead_tokens=12.5)
NOW = 100.0


def running(key, audio_tokens, since_s, rows=1, arrived=0.0):
    """A call past its first chunk that produced `audio_tokens` audio tokens in `since_s` seconds."""
    return CallState(key, rows, arrived, new_tokens=50, audio_tokens=audio_tokens, first_chunk_at=NOW - since_s)


def joining(key, rows, arrived):
    return CallState(key, rows, arrived, new_tokens=0)


def test_everyone_runs_when_nobody_joins():
    calls = [running("a", 100, 1.0), running("b", 5, 1.0)]
    assert decide(calls, NOW, CFG) == {"a": 1, "b": 1}


def test_a_call_ahead_of_real_time_waits_while_one_joins():
    # a: 40 tokens in 2 s is 15 ahead of 12.5/s (> 12.5 lead): waits; b: 30 in 2 s is 5 ahead: runs
    calls = [running("a", 40, 2.0), running("b", 30, 2.0), joining("j", 20, arrived=99.0)]
    assert decide(calls, NOW, CFG) == {"b": 1, "j": 20}


def test_a_call_behind_real_time_never_waits():
    calls = [running("slow", 3, 2.0), joining("j", 1, arrived=99.0)]
    assert decide(calls, NOW, CFG) == {"slow": 1, "j": 1}


def test_a_waiting_call_runs_again_once_real_time_catches_up():
    call = running("a", 40, 2.0)
    j = joining("j", 1, arrived=99.0)
    assert "a" not in decide([call, j], NOW, CFG)
    # 0.3 s later the same 40 tokens are only 40 - 12.5 * 2.3 = 11.25 ahead: it runs
    assert "a" in decide([call, j], NOW + 0.3, CFG)


def test_prefill_is_chunked_to_the_step_budget_and_one_row_steps_count():
    calls = [running(f"r{i}", 0, 1.0) for i in range(4)] + [joining("long", 500, arrived=99.0)]
    out = decide(calls, NOW, CFG)
    assert out["long"] == 64 - 4 and all(out[f"r{i}"] == 1 for i in range(4))


def test_running_calls_run_whole_and_joiners_share_the_rest_by_arrival():
    calls = [
        running("catchup", 0, 1.0, rows=11, arrived=1.0),  # a backbone catch-up after an MCTP run
        joining("late", 40, arrived=50.0),
        joining("early", 40, arrived=40.0),
    ]
    assert decide(calls, NOW, CFG) == {"catchup": 11, "early": 40, "late": 13}  # 64 rows in all


def test_a_joiner_one_row_step_waits_only_for_the_budget():
    calls = [joining("a", 64, arrived=1.0), joining("b", 1, arrived=2.0)]
    assert decide(calls, NOW, CFG) == {"a": 64}
    assert decide([joining("a", 63, arrived=1.0), joining("b", 1, arrived=2.0)], NOW, CFG) == {"a": 63, "b": 1}


def test_the_first_prefill_progresses_even_when_one_row_steps_fill_the_budget():
    calls = [running(f"r{i}", 0, 1.0, rows=11) for i in range(7)] + [joining("j", 100, arrived=99.0)]
    out = decide(calls, NOW, CFG)
    assert out["j"] == CFG.min_chunk and all(out[f"r{i}"] == 11 for i in range(7))


def test_a_short_step_is_never_cut():
    assert decide([joining("j", 5, arrived=1.0)], NOW, CFG) == {"j": 5}


@pytest.mark.parametrize("bad", [dict(step_tokens=0), dict(min_chunk=0), dict(lead_tokens=-1)])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        SchedulerConfig(**bad)


def test_settings_from_the_triton_config_strings():
    """config.pbtxt's parameters: empty keeps the default; a bad value names its setting."""
    assert SchedulerConfig.from_strings({}) == SchedulerConfig()
    assert SchedulerConfig.from_strings({"step_tokens": "", "lead_tokens": " "}) == SchedulerConfig()
    assert SchedulerConfig.from_strings({"step_tokens": "256", "min_chunk": "16", "lead_tokens": "6.25"}) == \
        SchedulerConfig(step_tokens=256, min_chunk=16, lead_tokens=6.25)
    for values, words in (({"step_tokens": "1.5"}, "step_tokens must be an integer"),
                          ({"lead_tokens": "soon"}, "lead_tokens must be a number"),
                          ({"min_chunk": "0"}, "min_chunk must be >= 1"),
                          ({"lead_tokens": "inf"}, "lead_tokens a finite number")):
        with pytest.raises(ValueError, match=words):
            SchedulerConfig.from_strings(values)
