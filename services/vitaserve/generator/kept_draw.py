"""One sampled row on the CPU, bit-identical to HF's warpers + torch.multinomial, at a fraction of the cost.

With top-k set (the released generation_config: top_k 20, top_p 0.8, temperature 0.7), at most a
few dozen of the 168072 ids survive the warpers, yet the reference path spends ~15 ms a row on the
whole vocabulary: top-p sorts it (4-18 ms) and multinomial draws an exponential for every id (~5 ms).
Here only the kept ids are sorted and divided, and the draw is rebuilt from the same random numbers:

- top-p: HF sorts the row ascending and takes softmax then cumsum over the sorted row. The sorted
  row is the removed ids' -inf, then the kept values ascending. We build exactly that row from the
  kept values alone, so softmax and cumsum see the same numbers in the same places: the same cut,
  bit for bit. Equal kept values are the exception: the CPU sort is not stable and orders ties by
  rules of its own, so such a row takes the reference path.
- the draw: for one sample torch.multinomial computes argmax(p / q) with q ~ Exp(1), one q per id,
  q_i = -log1p(-u_i), u_i the low 53 bits of the generator's i-th 64-bit number over 2^53. An int64
  `random_` over the row takes the same numbers (the generator ends in the same state), and p is 0
  outside the kept ids, so only their q are computed (with libm's log1p, as torch's kernel does).

This rests on torch's CPU kernels (tested against them in tests/test_kept_draw.py); `usable()` checks
it once per process, and the sampler takes the reference path when the check fails.
"""

from __future__ import annotations

import functools
import math
import os

import structlog
import torch

from vitaserve.lmtext.sampling_params import SamplingParams

log = structlog.get_logger(__name__)

REFERENCE_ENV = "VITA_SAMPLING_REFERENCE"
MASK_53 = (1 << 53) - 1
TWO_TO_MINUS_53 = 2.0 ** -53


def kept_draw(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int | None:
    """The token HF's warpers and torch.multinomial(probs, 1, generator) pick from one row of
    penalised scores [V] (fp32, CPU), advancing `generator` as they would. None, with the generator
    untouched, when this row needs the reference path: no top-k, a kept score that is not finite, or
    two kept scores that are equal (the CPU sort orders ties by its own rules: only sorting the whole
    row reproduces them)."""
    vocab = scores.shape[-1]
    if params.top_k <= 0:
        return None
    row = scores / params.temperature
    top = torch.topk(row, min(params.top_k, vocab)).values  # NaN and +inf, if any, come first
    if not bool(torch.isfinite(top).all()):
        return None
    kept = torch.nonzero(row >= top[-1])[:, 0]  # ascending ids: HF keeps every id not below the k-th value
    values = row[kept]
    ascending, order = torch.sort(values)
    if bool((ascending[1:] == ascending[:-1]).any()):
        return None
    if params.top_p < 1.0:
        full = torch.full((vocab,), float("-inf"), dtype=row.dtype)
        full[vocab - values.numel():] = ascending  # the row HF sorts, exactly
        cum = full.softmax(-1).cumsum(-1)[vocab - values.numel():]
        keep = cum > 1 - params.top_p  # HF removes cum <= 1 - top_p
        keep[-1] = True  # always keep the most likely token
        kept = kept[order[keep]].sort().values
    warped = torch.full((vocab,), float("-inf"), dtype=row.dtype)
    warped[kept] = row[kept]
    probs = warped.softmax(-1)  # over the whole row: the same sum as the reference's softmax
    randoms = torch.empty(vocab, dtype=torch.int64).random_(generator=generator)
    if bool(((randoms & MASK_53) == 0).any()):  # a zero exponential (odds ~2e-11 a row): the reference
        q = (-torch.log1p(-(randoms & MASK_53).double() * TWO_TO_MINUS_53)).float()  # divides by it: do
        return int(torch.argmax(probs / q))  # the same over the whole row (torch's log1p, not libm's)
    bits = randoms[kept].tolist()
    q = torch.tensor([-math.log1p(-((b & MASK_53) * TWO_TO_MINUS_53)) for b in bits], dtype=torch.float64).float()
    return int(kept[int(torch.argmax(probs[kept] / q))])


@functools.cache
def usable() -> bool:
    """Whether `kept_draw` equals the reference (sampling.select_token) on this torch build, checked
    once per process on a few seeded rows; a torch whose kernels changed takes the reference path.
    $VITA_SAMPLING_REFERENCE=1 takes it too (benchmarks compare both sides with it)."""
    from vitaserve.generator.sampling import select_token

    if os.environ.get(REFERENCE_ENV) == "1":
        return False
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.0)
    rows = torch.randn(4, 4096, generator=torch.Generator().manual_seed(7)) * 3
    none = torch.zeros(0, dtype=torch.long)
    for i, row in enumerate(rows):
        ours, theirs = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        for _ in range(4):
            if (kept_draw(row, params, ours) != select_token(row, none, params, theirs)
                    or not torch.equal(ours.get_state(), theirs.get_state())):
                log.warning("sampled rows take the reference path: the kept-ids draw does not match "
                            "this torch build's multinomial", torch=torch.__version__)
                return False
    return True
