"""Token selection with the semantics of HF `generate` (the official code path).

Order as in transformers: repetition penalty over every id of the sequence (prompt included; it also
applies to greedy decoding, and the released generation_config.json sets 1.05), then, only when
sampling, temperature, top-k and top-p. Logits are processed in fp32. Each sequence draws from its
own `torch.Generator`, so a seed reproduces a call without touching the process-wide RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vitaserve.generator.config import GenerationDefaults


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults, **overrides) -> "SamplingParams":
        """The checkpoint's generation_config.json values, with any non-None override applied."""
        params = cls(
            do_sample=defaults.do_sample,
            temperature=defaults.temperature,
            top_k=defaults.top_k,
            top_p=defaults.top_p,
            repetition_penalty=defaults.repetition_penalty,
        )
        return replace(params, **{k: v for k, v in overrides.items() if v is not None}).validated()

    def validated(self) -> "SamplingParams":
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    def make_generator(self, device) -> torch.Generator | None:
        if not self.do_sample:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
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
