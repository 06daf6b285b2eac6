"""The static-shape one-row step of generator/cuda_graphs.py, on the CPU: padded up to its bucket it
computes what the eager BatchIndex path computes, writes only its own cache rows (padding goes to the
scratch slot), and an engine whose one-row groups take it emits the same tokens in every mode. The
CUDA-graph capture itself needs a GPU: benchmarks/gpu_check.sh runs it there.

Tolerance: both paths do the same fp32 arithmetic; only summation order may differ (a GEMM over 4
padded rows instead of 3 may block differently; attention over a 64-key bucket adds masked keys whose
softmax weight is exactly 0). Reordering a sum of K terms moves it by at most ~K * 2^-24 relative;
K <= 176 (the tiny model's widest product) gives ~1e-5 of the unit-scale normed outputs, so 1e-4
absolute separates a reordering from a wrong row, mask or cache index (those move outputs by O(1))."""

from __future__ import annotations

import random

import pytest
import torch

from vitaserve.generator.cuda_graphs import DecodeGraphs, bucket_of, key_bucket
from vitaserve.generator.engine import Engine, Request
from vitaserve.generator.language_model import LanguageModel
from vitaserve.generator.model import BatchIndex
from vitaserve.lmtext.sampling_params import SamplingParams

ATOL = 1e-4
GREEDY = SamplingParams(do_sample=False, repetition_penalty=1.05)


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return LanguageModel.from_folder(tiny_lm_dir, num_slots=4, max_len=128)


def _prefill(lm, slots, lengths, seed=0):
    """Fill each slot's cache with a random prompt through the eager path; returns the prompts."""
    rng = random.Random(seed)
    prompts = []
    for slot, n in zip(slots, lengths):
        ids = [rng.randrange(lm.vocab.endoftext_id) for _ in range(n)]
        with torch.inference_mode():
            lm.model.forward_backbone(torch.tensor([ids]), torch.arange(n)[None], BatchIndex([slot], [0], [n], "cpu"))
        prompts.append(ids)
    return prompts


def _caches(lm):
    return [(l.self_attn.kv_cache.k_cache.clone(), l.self_attn.kv_cache.v_cache.clone()) for l in lm.model.model.layers]


def test_buckets():
    assert [bucket_of(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="exceed the largest batch bucket"):
        bucket_of(9, (1, 2, 4, 8))
    assert [key_bucket(n, 4096) for n in (1, 64, 65, 300)] == [64, 64, 128, 512]
    assert key_bucket(300, 256) == 256


@pytest.mark.parametrize("module", [-1, 0, 9])
@pytest.mark.parametrize("rows", [[1, 1, 1], [1, 3, 2]])
def test_padded_static_step_equals_eager_step(lm, module, rows):
    """3 sequences padded to a batch bucket of 4, their rows (1 each, or 1..3) to a rows bucket;
    slots not contiguous, slot 1 free."""
    slots, lengths = [2, 0, 3], [5, 9, 7]
    _prefill(lm, slots, lengths)
    rng = torch.Generator().manual_seed(1)
    ids = [[int(x) for x in torch.randint(0, lm.vocab.endoftext_id, (t,), generator=rng)] for t in rows]
    hidden = [torch.randn(t, lm.config.hidden_size, generator=rng) for t in rows]
    width = max(rows)
    before = _caches(lm)
    with torch.inference_mode():  # the eager path: one BatchIndex forward, rows padded to the widest
        batch = BatchIndex(slots, lengths, rows, "cpu")
        id_t = torch.zeros(3, width, dtype=torch.long)
        rope = torch.zeros(3, width, dtype=torch.long)
        hid = torch.zeros(3, width, lm.config.hidden_size)
        for b, t in enumerate(rows):
            id_t[b, :t], rope[b, :t], hid[b, :t] = torch.tensor(ids[b]), torch.arange(lengths[b], lengths[b] + t), hidden[b]
        if module < 0:
            eager = lm.model.forward_backbone(id_t, rope, batch)
        else:
            eager = lm.model.forward_mtp(module, id_t, hid, rope, batch)
    eager_caches = _caches(lm)
    for layer, (k, v) in zip(lm.model.model.layers, before):  # undo the eager step's writes
        layer.self_attn.kv_cache.k_cache.copy_(k)
        layer.self_attn.kv_cache.v_cache.copy_(v)
    graphs = DecodeGraphs(lm.model, buckets=(1, 2, 4))
    static = graphs.run(module, ids, lengths, slots, lengths, hidden if module >= 0 else None)
    assert graphs.eager_steps == 1 and graphs.replays == 0  # no capture on the CPU
    assert static.shape[:2] == (3, 1 if width == 1 else 4)
    for b, t in enumerate(rows):
        torch.testing.assert_close(static[b, :t], eager[b, :t], atol=ATOL, rtol=0)
    scratch = lm.model.num_slots
    for (k_e, v_e), layer in zip(eager_caches, lm.model.model.layers):
        cache = layer.self_attn.kv_cache
        # every real slot's cache equals the eager step's: its own rows written, nothing else touched
        torch.testing.assert_close(cache.k_cache[:scratch], k_e[:scratch], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache.v_cache[:scratch], v_e[:scratch], atol=ATOL, rtol=0)
    for (k_b, _), layer in zip(before, lm.model.model.layers):  # the free slot is untouched
        assert torch.equal(layer.self_attn.kv_cache.k_cache[1], k_b[1])


def test_a_prefill_does_not_fit(lm):
    class Plan:
        kind, module, ids, rope_start, cache_start, hidden = "M", -1, list(range(17)), 0, 0, None

    graphs = DecodeGraphs(lm.model)
    assert not graphs.fits([Plan()])
    with pytest.raises(ValueError, match="run them on the eager path"):
        graphs.forward_plans([Plan()])
    with pytest.raises(ValueError, match="cuda device"):
        DecodeGraphs(lm.model, capture=True)


def _tokens(lm, mode: str, prompts: list[list[int]], max_new_tokens: int = 24) -> dict[str, list[int]]:
    engine = Engine(lm)
    for i, p in enumerate(prompts):
        engine.add(Request(f"c{i}", p, mode, GREEDY, max_new_tokens, stop_ids=()))
    out: dict[str, list[int]] = {f"c{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for rid, event in engine.step():
            assert not isinstance(event, Exception), event
            out[rid].append(event.token_id)
    return out


@pytest.mark.parametrize("mode", ["vanilla", "balance", "boost", "turbo"])
def test_engine_through_static_steps_emits_the_same_tokens(lm, mode):
    """With decode graphs attached, the runner sends every group that fits through the static path
    (runner.forward_group); the tokens are those of the eager path."""
    rng = random.Random(3)
    prompts = [[rng.randrange(lm.vocab.endoftext_id) for _ in range(n)] for n in (6, 11, 8)]
    expected = _tokens(lm, mode, prompts)
    graphs = DecodeGraphs.attach(lm.model, buckets=(1, 2, 4))
    try:
        got = _tokens(lm, mode, prompts)
    finally:
        lm.model.decode_graphs = None
    assert graphs.eager_steps > 0  # the static path really served steps (all but the prefills)
    assert got == expected


def test_bf16_engine_through_static_steps_emits_the_same_tokens(tiny_lm_dir):
    """The GPU dtype on the CPU. Both paths round every product to bf16 the same way; they differ
    only in summation order inside fp32 accumulators, so a greedy id could change only at a near-tie
    of two logits (within ~2^-8 relative), which these seeded prompts do not have: on a given machine
    the result is deterministic, and a wrong row, mask or cache index changes the ids at once."""
    lm = LanguageModel.from_folder(tiny_lm_dir, num_slots=4, max_len=128, dtype="bfloat16")
    rng = random.Random(3)
    prompts = [[rng.randrange(lm.vocab.endoftext_id) for _ in range(n)] for n in (6, 11, 8)]
    expected = _tokens(lm, "boost", prompts)
    graphs = DecodeGraphs.attach(lm.model, buckets=(1, 2, 4))
    got = _tokens(lm, "boost", prompts)
    assert graphs.eager_steps > 0 and lm.model.lm_head.weight.dtype == torch.bfloat16
    assert got == expected
