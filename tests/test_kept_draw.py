"""The CPU kept-ids draw against the reference path (HF's warpers + torch.multinomial), bit for bit.

No tolerance: kept_draw.py rebuilds the very numbers the reference computes (the sorted row that
top-p softmaxes and sums, the whole-row softmax, the same generator's 64-bit numbers turned into
exponentials as torch's kernel turns them), so the token and the generator's state after the draw
must be equal, on every seed. Rows it cannot reproduce (ties among the kept scores, NaN, no top-k)
must be handed back untouched, for the reference path to take.
"""

from __future__ import annotations

import pytest
import torch

from vitaserve.generator import kept_draw as kd
from vitaserve.generator.sampling import BatchSampler, select_token
from vitaserve.lmtext.sampling_params import SamplingParams

NONE = torch.zeros(0, dtype=torch.long)
RELEASED = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)  # generation_config.json
SETTINGS = [RELEASED,
            SamplingParams(do_sample=True, temperature=1.0, top_k=1),
            SamplingParams(do_sample=True, temperature=1.3, top_k=50, top_p=0.95),
            SamplingParams(do_sample=True, temperature=0.5, top_k=5, top_p=0.3),
            SamplingParams(do_sample=True, temperature=1.0, top_k=200, top_p=1.0)]


def _row(seed: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_the_same_token_and_generator_state_as_the_reference(params):
    for seed in range(40):
        row = _row(seed, 32768)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):  # successive draws from the same generators
            token = kd.kept_draw(row, params, ours)
            assert token == select_token(row, NONE, params, theirs), seed
            assert torch.equal(ours.get_state(), theirs.get_state()), seed


def test_the_released_vocabulary_and_settings():
    for seed in range(6):
        row = _row(seed, 168072)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert kd.kept_draw(row, RELEASED, ours) == select_token(row, NONE, RELEASED, theirs)
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_the_draw_follows_the_probabilities():
    """Not a tautology of the equality above: the draws land on the kept ids in proportion. Three
    kept ids with probabilities 0.6/0.3/0.1 (top-k 3, temperature 1): 4000 draws, each count within
    5 standard deviations of its expectation (a false failure has odds below 1e-6)."""
    row = torch.full((1000,), -30.0)
    ids = torch.tensor([17, 400, 999])
    row[ids] = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=3)
    gen = torch.Generator().manual_seed(0)
    draws = [kd.kept_draw(row, params, gen) for _ in range(4000)]
    for token, p in zip(ids.tolist(), (0.6, 0.3, 0.1)):
        expected, sd = 4000 * p, (4000 * p * (1 - p)) ** 0.5
        assert abs(draws.count(token) - expected) <= 5 * sd, (token, draws.count(token))
    assert set(draws) <= set(ids.tolist())


@pytest.mark.parametrize("case", ["tie", "nan", "no-top-k"])
def test_rows_it_cannot_reproduce_go_back_untouched(case):
    row, params = _row(3, 4096), RELEASED
    if case == "tie":  # equal kept scores: the CPU sort's own order decides the top-p cut
        row[:30] = row.max()
    elif case == "nan":
        row[5] = float("nan")
    else:
        params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.8)
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state().clone()
    assert kd.kept_draw(row, params, gen) is None
    assert torch.equal(gen.get_state(), state)


def test_the_batch_sampler_draws_kept_rows_and_hands_the_rest_to_the_reference(monkeypatch):
    """A CPU batch of released-settings rows, one with ties: every token equals the one-row reference,
    and the kept path drew every row but the tied one."""
    vocab, rows = 4096, 5
    logits = torch.stack([_row(s, vocab) for s in range(rows)])
    logits[2, :30] = logits[2].max()
    assert kd.usable()  # its check (cached) runs before the count
    calls = []
    real = kd.kept_draw
    monkeypatch.setattr(kd, "kept_draw", lambda *a: calls.append(r := real(*a)) or r)
    sampler = BatchSampler(rows, vocab, "cpu", max_len=64)
    params = [SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=s)
              for s in range(rows)]
    for slot, p in enumerate(params):
        sampler.start(slot, [slot + 1, 7], p, torch.Generator().manual_seed(p.seed))
    tokens, failed = sampler.select(logits.clone(), list(range(rows)))
    want = [select_token(logits[b], torch.tensor([b + 1, 7]), params[b], torch.Generator().manual_seed(b))
            for b in range(rows)]
    assert tokens == want and not any(failed)
    assert [c is None for c in calls] == [False, False, True, False, False]


def test_this_torch_build_passes_the_start_up_check():
    assert kd.usable()
