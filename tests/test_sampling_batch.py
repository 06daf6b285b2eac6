"""The batched sampler against transformers' processors and against the one-row reference path.

Tolerances. Every op of the batch path is the same fp32 op the one-row path and transformers apply to
the same inputs: the penalty is one rounding of x * p or x / p with p the same float32 value (a
Python float is rounded to float32 before a float32 tensor op, and our per-row tensor holds that same
float32), temperature one rounding of x / t, top-k compares against the exact k-th value (a sort
and a topk return the same element), top-p runs softmax and cumsum per row, which reduce each row in
the same order whether the row is alone or in a batch. So the expected difference is zero, and the
tests compare with torch.equal. Greedy argmax over bit-identical rows is the same index (ties go to
the first index in both), so tokens are compared for equality. A sampled row draws with its own
generator from bit-identical probabilities, so its token is the same draw as the one-row path's.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vitaserve.generator.sampling import BatchSampler, penalize, select_token, warp_batch
from vitaserve.lmtext.sampling_params import SamplingParams

V = 1000
ROWS = [  # mixed settings in one batch: greedy with and without penalty, sampled with every warper
    SamplingParams(repetition_penalty=1.05),
    SamplingParams(repetition_penalty=1.0),
    SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=1),
    SamplingParams(do_sample=True, temperature=1.5, top_k=0, top_p=0.5, repetition_penalty=1.0, seed=2),
    SamplingParams(do_sample=True, temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=0.8, seed=3),
    SamplingParams(repetition_penalty=2.0),
]


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(ROWS), V, generator=g) * 4
    ids = [torch.randint(0, V, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g) for _ in ROWS]
    return logits, ids


def _hf_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers, in generate's order, on one row [1, V]; only those generate adds."""
    if p.temperature != 1.0:
        row = TemperatureLogitsWarper(p.temperature)(None, row)
    if p.top_k > 0:
        row = TopKLogitsWarper(p.top_k)(None, row)
    if p.top_p < 1.0:
        row = TopPLogitsWarper(p.top_p)(None, row)
    return row


def _padded(ids):
    """Rows of ids [B, L], each padded with its own first id (what BatchSampler keeps)."""
    width = max(len(r) for r in ids)
    return torch.stack([torch.cat((r, r[:1].expand(width - len(r)))) for r in ids])


@pytest.mark.parametrize("seed", range(5))
def test_penalty_equals_transformers_per_row(seed):
    logits, ids = _case(seed)
    got = penalize(logits.clone(), _padded(ids), torch.tensor([p.repetition_penalty for p in ROWS]))
    for b, p in enumerate(ROWS):
        want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids[b][None], logits[b : b + 1])[0]
        assert torch.equal(got[b], want), b
    assert not torch.equal(got[0], logits[0])  # the penalty did something


@pytest.mark.parametrize("seed", range(5))
def test_warpers_equal_transformers_per_row(seed):
    logits, _ = _case(seed)
    sampled = [p for p in ROWS if p.do_sample]
    rows = logits[: len(sampled)]
    got = warp_batch(rows, sampled)
    for b, p in enumerate(sampled):
        assert torch.equal(got[b], _hf_warp(rows[b : b + 1], p)[0]), b
    # a filter really ran: top-k 5 keeps exactly 5
    assert int(torch.isfinite(got[2]).sum()) == 5


def _sampler(ids):
    sampler = BatchSampler(len(ROWS), V, "cpu", max_len=512)
    gens = []
    for slot, (p, row_ids) in enumerate(zip(ROWS, ids)):
        gen = torch.Generator().manual_seed(p.seed) if p.do_sample else None
        sampler.start(slot, row_ids.tolist(), p, gen)
        gens.append(gen)
    return sampler


@pytest.mark.parametrize("seed", range(5))
def test_batch_select_equals_the_one_row_path(seed):
    logits, ids = _case(seed)
    tokens, failed = _sampler(ids).select(logits.clone(), list(range(len(ROWS))))
    want = [select_token(logits[b], ids[b], p, torch.Generator().manual_seed(p.seed) if p.do_sample else None)
            for b, p in enumerate(ROWS)]
    assert tokens == want and not any(failed)


def test_slots_in_any_order_and_a_subset():
    logits, ids = _case(7)
    sampler = _sampler(ids)
    order = [5, 0, 2]
    tokens, _ = sampler.select(logits[order].clone(), order)
    want = [select_token(logits[b], ids[b], ROWS[b],
                         torch.Generator().manual_seed(ROWS[b].seed) if ROWS[b].do_sample else None) for b in order]
    assert tokens == want


def test_commit_appends_the_token_in_place_and_the_penalty_then_applies_to_it():
    logits, ids = _case(8)
    sampler = _sampler(ids)
    buffer = sampler.ids
    token = next(t for t in range(V) if t not in set(ids[0].tolist()))
    sampler.commit([0], [token])
    assert sampler.ids is buffer and sampler.lengths[0] == len(ids[0]) + 1
    assert sampler.ids[0, : len(ids[0]) + 1].tolist() == ids[0].tolist() + [token]
    width = max(sampler.lengths)
    got = penalize(logits.clone(), sampler.ids[:, :width], sampler.penalty)
    before = logits[0, token].item()
    assert got[0, token].item() == pytest.approx(before * 1.05 if before < 0 else before / 1.05, rel=1e-6)
    assert torch.equal(got[1], logits[1])  # penalty 1.0 row untouched


def test_start_resets_a_reused_slot():
    logits, ids = _case(9)
    sampler = _sampler(ids)
    sampler.start(0, [3], SamplingParams(repetition_penalty=1.05), None)
    assert sampler.lengths[0] == 1 and set(sampler.ids[0].tolist()) == {3}


@pytest.mark.parametrize("bad_row", [0, 2])  # a greedy row and a sampled row
def test_a_nan_row_fails_alone(bad_row):
    logits, ids = _case(10)
    logits[bad_row, 17] = float("nan")
    tokens, failed = _sampler(ids).select(logits.clone(), list(range(len(ROWS))))
    assert failed == [b == bad_row for b in range(len(ROWS))]
    clean, _ = _sampler(ids).select(_case(10)[0], list(range(len(ROWS))))
    assert [t for b, t in enumerate(tokens) if b != bad_row] == [t for b, t in enumerate(clean) if b != bad_row]


def test_a_sampled_row_with_nothing_to_draw_fails_alone():
    """All scores -inf (e.g. a temperature that validation refuses, built past it) is not a distribution."""
    logits, ids = _case(11)
    logits[3] = float("-inf")
    _, failed = _sampler(ids).select(logits, list(range(len(ROWS))))
    assert failed == [b == 3 for b in range(len(ROWS))]


def test_warpers_that_no_row_uses_leave_the_rows_as_transformers_does():
    logits, _ = _case(12)
    plain = [SamplingParams(do_sample=True, temperature=t) for t in (0.5, 1.0, 2.0)]
    got = warp_batch(logits[:3], plain)
    for b, p in enumerate(plain):
        assert torch.equal(got[b], _hf_warp(logits[b : b + 1], p)[0])
    assert torch.isfinite(got).all()
