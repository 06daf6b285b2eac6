"""The language model against transformers' Qwen2 and against a cache-free recompute."""

from __future__ import annotations

import random

import pytest
import torch

from vitaserve.generator.generate import generate
from vitaserve.generator.model import BatchIndex
from vitaserve.lmtext.sampling_params import SamplingParams
from vitaserve.lmtext.schedule import MODES

from lm_reference import reference_generate, reference_logits

GREEDY = SamplingParams(repetition_penalty=1.05)  # the released default penalty applies to greedy too


def random_prompt(lm, n, seed):
    rng = random.Random(seed)
    return [rng.randrange(lm.config.vocab_size) for _ in range(n)]


def hf_qwen2(lm):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = lm.config
    hf_cfg = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_backbone_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    mtp_layers = {f"model.layers.{c.mtp_layer_index(i)}." for i in range(c.num_nextn_predict_layers)}
    state = {
        k: v for k, v in lm.model.state_dict().items()
        if not k.startswith("mtp_") and not any(k.startswith(p) for p in mtp_layers)
    }
    hf.load_state_dict(state, strict=True)
    return hf


def test_backbone_logits_equal_transformers_qwen2(tiny_lm):
    hf = hf_qwen2(tiny_lm)
    ids = random_prompt(tiny_lm, 37, seed=1)
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
        h = tiny_lm.model.forward_backbone(torch.tensor([ids]), torch.arange(len(ids))[None], None)
        got = tiny_lm.model.logits(h)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cached_backbone_prefill_then_steps_equals_transformers(tiny_lm):
    hf = hf_qwen2(tiny_lm)
    ids = random_prompt(tiny_lm, 20, seed=2)
    model = tiny_lm.model
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
        # prefill 12 rows in slot 2, then 3-row and 1-row chunks: the cache must give the same logits
        outs = []
        for lo, hi in [(0, 12), (12, 15), (15, 16), (16, 20)]:
            batch = BatchIndex([2], [lo], [hi - lo], "cpu")
            h = model.forward_backbone(torch.tensor([ids[lo:hi]]), torch.arange(lo, hi)[None], batch)
            outs.append(model.logits(h)[0])
    torch.testing.assert_close(torch.cat(outs), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_cached_generation_equals_full_recompute(tiny_lm, mode):
    prompt = random_prompt(tiny_lm, 19, seed=3)
    n = 45
    events = list(generate(tiny_lm, prompt, mode, GREEDY, max_new_tokens=n, stop_ids=()))
    want = reference_generate(tiny_lm.model, prompt, tiny_lm.schedule(mode), n, GREEDY)
    assert [e.token_id for e in events] == want


def test_mtp_step_uses_shifted_ids_and_previous_module_output(tiny_lm):
    """Guard the official wiring: changing the id at row j + i + 1 changes module i's logits,
    and module 1's output differs from module 0's (it stacks on it)."""
    ids = random_prompt(tiny_lm, 12, seed=4)
    m0 = reference_logits(tiny_lm.model, ids, "m", 0)
    m1 = reference_logits(tiny_lm.model, ids, "m", 1)
    assert not torch.allclose(m0, m1)
    changed = list(ids)
    changed[-1] = (changed[-1] + 1) % tiny_lm.config.vocab_size  # the id module 0 embeds at the last row
    assert not torch.allclose(reference_logits(tiny_lm.model, changed, "m", 0), m0)
    # the backbone at the same step would not see the last id's embedding as an MCTP input
    assert torch.allclose(reference_logits(tiny_lm.model, ids[:-1], "M", -1),
                          reference_logits(tiny_lm.model, changed[:-1], "M", -1))


@pytest.mark.parametrize("mode", ["vanilla", "balance", "boost", "turbo"])
def test_each_mode_emits_its_schedule_pattern(tiny_lm, mode):
    events = list(generate(tiny_lm, [5, 6, 7], mode, GREEDY, max_new_tokens=60, stop_ids=()))
    got = "".join(e.kind for e in events)
    expected = {
        "vanilla": "M" * 60,
        "balance": "M" + "m" * 4 + "MMM" + "m" * 8 + ("MMMM" + "m" * 10) * 4,
        "boost": "M" + "m" * 10 + ("MMMM" + "m" * 10) * 4,
        "turbo": ("M" + "m" * 10) * 6,
    }[mode][:60]
    assert got == expected
    # modules count up from 0 after each backbone step
    for prev, e in zip(events, events[1:]):
        if e.kind == "m":
            assert e.module == (0 if prev.kind == "M" else prev.module + 1)


def test_custom_mode_list(tiny_lm):
    events = list(generate(tiny_lm, [5, 6, 7], [2, 3, 1, 1], GREEDY, max_new_tokens=9, stop_ids=()))
    assert "".join(e.kind for e in events) == "MMmmmMmMm"


def test_stops_on_end_id_and_reports_it(tiny_lm):
    prompt = random_prompt(tiny_lm, 10, seed=5)
    free = [e.token_id for e in generate(tiny_lm, prompt, "boost", GREEDY, max_new_tokens=30, stop_ids=())]
    stop = free[7]
    events = list(generate(tiny_lm, prompt, "boost", GREEDY, max_new_tokens=30, stop_ids=(stop,)))
    first = free.index(stop)
    assert [e.token_id for e in events] == free[: first + 1]
    assert events[-1].finished and not any(e.finished for e in events[:-1])


def test_sampling_reproduces_with_seed(tiny_lm):
    prompt = random_prompt(tiny_lm, 10, seed=6)
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.05, seed=123)
    a = [e.token_id for e in generate(tiny_lm, prompt, "boost", params, max_new_tokens=30, stop_ids=())]
    b = [e.token_id for e in generate(tiny_lm, prompt, "boost", params, max_new_tokens=30, stop_ids=())]
    c = [e.token_id for e in generate(tiny_lm, prompt, "boost",
                                      SamplingParams(**{**params.__dict__, "seed": 124}), max_new_tokens=30, stop_ids=())]
    assert a == b
    assert a != c


def test_token_events_flag_audio_ids(tiny_lm):
    v = tiny_lm.vocab
    events = list(generate(tiny_lm, [5, 6, 7], "turbo", GREEDY, max_new_tokens=30, stop_ids=()))
    for e in events:
        assert e.is_audio == (v.audio_offset <= e.token_id < v.audio_offset + 16384)
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(events, events[1:]))


@pytest.mark.parametrize("bad,match", [([], "empty"), ([10**9], "outside")])
def test_bad_prompts_rejected(tiny_lm, bad, match):
    with pytest.raises(ValueError, match=match):
        list(generate(tiny_lm, bad, "boost", GREEDY, max_new_tokens=4))


def test_context_overflow_rejected(tiny_lm):
    with pytest.raises(ValueError, match="exceeds the context"):
        list(generate(tiny_lm, [1] * 500, "boost", GREEDY, max_new_tokens=100))


def test_engine_batched_calls_equal_each_alone(tiny_lm):
    """Sequences of different lengths and modes batched in one engine give their lone tokens."""
    from vitaserve.generator.engine import Engine, Request

    specs = [("a", 7, "boost", 30), ("b", 23, "balance", 25), ("c", 3, "vanilla", 12), ("d", 15, "turbo", 33),
             ("e", 11, [2, 3, 1, 5], 20)]
    alone = {
        rid: [e.token_id for e in generate(tiny_lm, random_prompt(tiny_lm, n, seed=10 + n), mode, GREEDY,
                                           max_new_tokens=m, stop_ids=())]
        for rid, n, mode, m in specs
    }
    engine = Engine(tiny_lm)  # 4 slots: the fifth call waits for a free slot
    for rid, n, mode, m in specs:
        engine.add(Request(rid, random_prompt(tiny_lm, n, seed=10 + n), mode, GREEDY, m, stop_ids=()))
    got = {rid: [] for rid, *_ in specs}
    steps = 0
    while engine.has_work():
        for rid, event in engine.step():
            got[rid].append(event.token_id)
        steps += 1
    assert got == alone
    assert steps < sum(m for *_, m in specs)  # calls really ran together


def test_engine_cancel_frees_slot_and_keeps_others(tiny_lm):
    from vitaserve.generator.engine import Engine, Request

    engine = Engine(tiny_lm)
    prompt = random_prompt(tiny_lm, 9, seed=42)
    alone = [e.token_id for e in generate(tiny_lm, prompt, "boost", GREEDY, max_new_tokens=20, stop_ids=())]
    engine.add(Request("keep", prompt, "boost", GREEDY, 20, stop_ids=()))
    engine.add(Request("drop", random_prompt(tiny_lm, 5, seed=43), "turbo", GREEDY, 20, stop_ids=()))
    got = []
    for i in range(20):
        if i == 3:
            assert engine.cancel("drop")
        got += [e.token_id for rid, e in engine.step() if rid == "keep"]
    assert got == alone and not engine.has_work()
    with pytest.raises(ValueError, match="inference mode"):
        engine.add(Request("bad", prompt, "1,11", GREEDY, 5))


def test_mtp_audio_head_is_off_by_default_and_only_touches_mcts_steps(tiny_lm_dir):
    """The optional audio-rows head: backbone tokens unchanged, MCTP tokens always audio ids, and
    identical to the full head whenever the full head's choice was an audio id."""
    from vitaserve.generator.language_model import LanguageModel

    full = LanguageModel.from_folder(tiny_lm_dir, max_len=256)
    fast = LanguageModel.from_folder(tiny_lm_dir, max_len=256, mtp_audio_head=True)
    assert full.model.mtp_audio_rows is None
    prompt = random_prompt(full, 12, seed=77)
    a = list(generate(full, prompt, "turbo", GREEDY, max_new_tokens=11, stop_ids=()))
    b = list(generate(fast, prompt, "turbo", GREEDY, max_new_tokens=11, stop_ids=()))
    assert a[0].token_id == b[0].token_id  # the backbone step uses the whole head
    assert all(e.is_audio for e in b[1:])
    for x, y in zip(a[1:], b[1:]):
        if x.token_id != y.token_id:
            assert not x.is_audio  # the only allowed difference: the full head chose a non-audio id
            break
