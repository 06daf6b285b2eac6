"""generator/linear.py: the few-row products on the CPU (W @ x^T, a single row doubled for the large
lm_head, 16 rows or more of it in blocks) equal F.linear to float32 rounding, and the engine's greedy
tokens are unchanged by them.

Tolerance (no constant tuned to a machine): each output is a K-term dot product plus a bias; two
summation orders of the same terms in float32 each differ from the exact sum by at most
gamma_K * sum_i |w_i x_i| (Higham, Accuracy and Stability of Numerical Algorithms, 3.1, with
gamma_K = K u / (1 - K u), u = 2^-24), and the bias add by one rounding of the result, so they
differ from each other by at most 2 (gamma_K * sum_i |w_i x_i| + u |y|). Tokens: a greedy token can
only change where the top two scores are closer than that bound (about 1e-6 of a score here); the
test would show it, and it would be a near-tie that any other BLAS or thread count splits too.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from vitaserve.generator import linear
from vitaserve.generator.language_model import LanguageModel
from vitaserve.generator.linear import Linear
from test_cuda_graphs import _tokens  # the engine's greedy tokens per call, one helper for both files

U = 2.0 ** -24


def bound(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    k = x.shape[-1]
    gamma = k * U / (1 - k * U)
    terms = x.abs().double() @ layer.weight.abs().double().t()
    y = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    return 2 * (gamma * terms + U * y.abs())


@pytest.mark.parametrize("out_features, in_features, bias, rows", [
    (1024, 512, True, 1), (1024, 512, True, 16), (3072, 512, False, 7), (512, 1408, False, 64),
    (4096 * 4 + 8, 1024, False, 1),  # over LARGE_WEIGHT: the single row is doubled
    (4096 * 4 + 8, 1024, False, 3), (256, 128, True, 65),  # 65 rows: F.linear itself
    (4096 * 4 + 8, 1024, True, 16), (4096 * 4 + 8, 1024, False, 40)])  # large, >= BLOCKED_ROWS: in blocks
def test_few_row_products_equal_f_linear_within_float32_rounding(out_features, in_features, bias, rows):
    torch.manual_seed(rows)
    layer = Linear(in_features, out_features, bias=bias)
    x = torch.randn(rows, 1, in_features)  # [calls, 1 row each, K]: a decode step
    with torch.inference_mode():  # as the engine runs
        ours, reference = layer(x), F.linear(x, layer.weight, layer.bias)
    assert ours.shape == reference.shape == (rows, 1, out_features) and ours.is_contiguous()
    diff = (ours.double() - reference.double()).abs()
    assert bool((diff <= bound(x, layer)).all()), float(diff.max())


def test_the_big_single_row_really_takes_the_doubled_path(monkeypatch):
    """The path choice is what the docstring says (else the figures would describe another path)."""
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(linear.torch, "mm", lambda a, b, **kw: calls.append((tuple(b.shape), "out" in kw))
                        or real_mm(a, b, **kw))
    big = Linear(1024, linear.LARGE_WEIGHT // 1024 + 8, bias=False)
    small = Linear(512, 512, bias=False)
    big(torch.randn(1, 1, 1024))
    small(torch.randn(1, 1, 512))
    small(torch.randn(linear.FEW_ROWS + 1, 512))  # a prefill's many rows: F.linear, no mm
    assert calls == [((1024, 2), False), ((512, 1), False)]
    calls.clear()
    with torch.inference_mode():
        small(torch.randn(linear.BLOCKED_ROWS, 512))  # a small weight: one product at any row count
        big(torch.randn(linear.BLOCKED_ROWS, 1024))  # a large one: a product per block of BLOCK rows
    blocks = -(-big.out_features // linear.BLOCK)
    assert calls == [((512, linear.BLOCKED_ROWS), False)] + [((1024, linear.BLOCKED_ROWS), True)] * blocks
    calls.clear()
    big(torch.randn(linear.BLOCKED_ROWS, 1024))  # with autograd on: one product (mm(out=) has no backward)
    assert calls == [((1024, linear.BLOCKED_ROWS), False)]


@pytest.mark.parametrize("mode", ["vanilla", "balance", "boost", "turbo"])
def test_engine_tokens_are_those_of_f_linear_in_every_mode(tiny_lm_dir, mode, monkeypatch):
    lm = LanguageModel.from_folder(tiny_lm_dir, num_slots=4, max_len=256)
    rng = random.Random(5)
    prompts = [[rng.randrange(lm.vocab.endoftext_id) for _ in range(n)] for n in (6, 11, 8)]
    ours = _tokens(lm, mode, prompts)
    # every product of 2 or more rows in blocks of 64 weight rows (the tiny weights are below LARGE_WEIGHT)
    for name, value in (("LARGE_WEIGHT", 0), ("BLOCKED_ROWS", 2), ("BLOCK", 64)):
        monkeypatch.setattr(linear, name, value)
    blocked = _tokens(lm, mode, prompts)
    monkeypatch.setattr(linear, "FEW_ROWS", 0)  # every product through F.linear
    reference = _tokens(lm, mode, prompts)
    assert ours == reference and blocked == reference
