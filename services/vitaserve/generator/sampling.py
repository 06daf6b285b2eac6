"""Token selection with the semantics of HF `generate` (the official code path).

Order as in transformers: repetition penalty over every id of the sequence (prompt included; it also
applies to greedy decoding, and the released generation_config.json sets 1.05), then, only when
sampling, temperature, top-k and top-p. Logits are processed in fp32. Each sequence draws from its
own `torch.Generator`, so a seed reproduces a call without touching the process-wide RNG.
"""

from __future__ import annotations


import torch

from vitaserve.lmtext.sampling_params import SamplingParams


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The call's own generator (None when greedy): a seed reproduces a call without touching the
    process-wide RNG."""
    if not params.do_sample:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V] fp32; seen_ids [N]: every id so far. Divide positive, multiply negative scores."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    score = logits.gather(0, seen_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen_ids, score)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p (HF's warpers, min_tokens_to_keep = 1) on logits [V]."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - params.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def select_token(
    logits: torch.Tensor, seen_ids: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick the next id from one row of logits [V]."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, params.repetition_penalty)
    if not params.do_sample:
        return int(torch.argmax(logits))
    probs = warp(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
