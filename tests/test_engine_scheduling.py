"""The engine under its step policy: chunked prefill gives the tokens of a whole prefill, running calls
keep decoding while a long prompt is prefilled, a joining call's first chunk is not slowed by calls
that are ahead of real time, and calls at different points of their schedules share forwards."""

from __future__ import annotations

import pytest

from vitaserve.generator.engine import Engine, Request
from vitaserve.generator.generate import generate
from vitaserve.generator.scheduler import SchedulerConfig

from test_lm_model import GREEDY, random_prompt


def alone(lm, prompt, mode, n):
    return [e.token_id for e in generate(lm, prompt, mode, GREEDY, max_new_tokens=n, stop_ids=())]


def drain(engine, got, steps=None):
    """Step until idle (or `steps` steps); append tokens to got[rid]; return the events per step."""
    per_step = []
    while engine.has_work() and (steps is None or len(per_step) < steps):
        events = engine.step()
        for rid, event in events:
            assert not isinstance(event, Exception), event
            got.setdefault(rid, []).append(event.token_id)
        per_step.append([rid for rid, _ in events])
    return per_step


@pytest.mark.parametrize("mode", ["boost", "vanilla", "balance"])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(tiny_lm, mode):
    prompt = random_prompt(tiny_lm, 45, seed=5)
    engine = Engine(tiny_lm, scheduler=SchedulerConfig(step_tokens=7, min_chunk=4))
    engine.add(Request("a", prompt, mode, GREEDY, 30, stop_ids=()))
    got = {}
    per_step = drain(engine, got)
    assert got["a"] == alone(tiny_lm, prompt, mode, 30)
    assert per_step[:6] == [[]] * 6  # 45 rows in chunks of 7: six steps without a token, then the first
    assert per_step[6] == ["a"]


def test_running_calls_keep_decoding_while_a_long_prompt_is_prefilled(tiny_lm):
    engine = Engine(tiny_lm, scheduler=SchedulerConfig(step_tokens=16, min_chunk=8, lead_tokens=1e9))
    short, long = random_prompt(tiny_lm, 6, seed=1), random_prompt(tiny_lm, 200, seed=2)
    engine.add(Request("run", short, "turbo", GREEDY, 60, stop_ids=()))
    got = {}
    drain(engine, got, steps=3)
    engine.add(Request("join", long, "turbo", GREEDY, 12, stop_ids=()))
    per_step = drain(engine, got, steps=12)
    assert all("run" in rids for rids in per_step)  # a token every step while "join" prefills
    assert not any("join" in rids for rids in per_step)  # 200 rows at <= 15 a step take > 12 steps
    drain(engine, got)
    assert got["run"] == alone(tiny_lm, short, "turbo", 60)
    assert got["join"] == alone(tiny_lm, long, "turbo", 12)


def test_calls_ahead_of_real_time_wait_while_a_call_joins_and_lose_no_token(tiny_lm):
    """The tiny model runs far faster than real time: after 100 steps a running call has some 80 audio
    tokens (turbo, ~97% of the tiny vocabulary is audio ids) made in 100 steps, so it is more than
    lead_tokens = 5 ahead of 12.5 tokens/s through the joiner's 11 steps as long as a step takes under
    (80 - 5) / 12.5 / 111 = 54 ms; a tiny step takes a few ms, so the test holds on a loaded machine."""
    prompts = {f"r{i}": random_prompt(tiny_lm, 8 + i, seed=20 + i) for i in range(3)}
    engine = Engine(tiny_lm, scheduler=SchedulerConfig(lead_tokens=5))
    for rid, p in prompts.items():
        engine.add(Request(rid, p, "turbo", GREEDY, 150, stop_ids=()))
    got = {}
    drain(engine, got, steps=100)
    joiner = random_prompt(tiny_lm, 10, seed=30)
    engine.add(Request("join", joiner, "turbo", GREEDY, 20, stop_ids=()))
    per_step = drain(engine, got, steps=11)
    assert all(rids == ["join"] for rids in per_step)  # the joiner's first chunk ran alone
    drain(engine, got)
    for rid, p in prompts.items():
        assert got[rid] == alone(tiny_lm, p, "turbo", 150)
    assert got["join"] == alone(tiny_lm, joiner, "turbo", 20)


@pytest.mark.parametrize("every_token", [False, True])
def test_the_real_time_lead_counts_audio_ids_or_every_token_for_benchmarks(tiny_lm, every_token):
    """Audio ids after the first chunk are what a caller hears; benchmarks on random weights (audio ids
    one time in ten) count every token instead, as their real-time check does."""
    prompt = random_prompt(tiny_lm, 8, seed=3)
    engine = Engine(tiny_lm, scheduler=SchedulerConfig(every_token_is_audio=every_token))
    engine.add(Request("a", prompt, "boost", GREEDY, 60, stop_ids=()))
    got = {}
    drain(engine, got, steps=40)
    run = engine.running["a"]
    after_first_chunk = got["a"][11:]
    assert len(after_first_chunk) > 10
    expected = len(after_first_chunk) if every_token else sum(map(tiny_lm.vocab.is_audio, after_first_chunk))
    assert run.audio_tokens == expected
    assert every_token or expected < len(after_first_chunk)  # the tiny model emits some text ids too


def test_calls_at_different_points_of_their_schedules_share_forwards(tiny_lm, monkeypatch):
    """Each step runs one forward per (kind, module) group among its plans, however many calls are
    in it and wherever each call is in its own schedule, and one lm_head product for all of them."""
    model = tiny_lm.model
    calls = {"forward": 0, "head": 0}
    for name in ("forward_backbone", "forward_mtp"):
        real = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _real=real, **k: (calls.__setitem__("forward", calls["forward"] + 1), _real(*a, **k))[1])
    real_logits = model.logits
    monkeypatch.setattr(model, "logits", lambda *a, **k: (calls.__setitem__("head", calls["head"] + 1), real_logits(*a, **k))[1])

    specs = {"a": ("boost", 5), "b": ("turbo", 9), "c": ("boost", 13), "d": ([2, 3, 1, 5], 7)}
    engine = Engine(tiny_lm, scheduler=SchedulerConfig(lead_tokens=1e9))
    got = {}
    for i, (rid, (mode, n)) in enumerate(specs.items()):
        engine.add(Request(rid, random_prompt(tiny_lm, n, seed=n), mode, GREEDY, 40, stop_ids=()))
        drain(engine, got, steps=3 + 2 * i)  # each call joins at another point of the others' schedules
    mixed_modes_shared = 0
    while engine.has_work():
        plans = {rid: run.seq.next_step + (run.seq.rows_needed() > 1,) for rid, run in engine.running.items()}
        calls.update(forward=0, head=0)
        drain(engine, got, steps=1)
        assert calls["forward"] == len(set(plans.values()))
        assert calls["head"] == 1
        groups = [{specs[r][0] if isinstance(specs[r][0], str) else "custom" for r in plans if plans[r] == g}
                  for g in set(plans.values())]
        mixed_modes_shared += any(len(modes) > 1 for modes in groups)
    assert mixed_modes_shared > 0  # calls of different modes met in one forward
    for rid, (mode, n) in specs.items():
        assert got[rid] == alone(tiny_lm, random_prompt(tiny_lm, n, seed=n), mode, 40)
