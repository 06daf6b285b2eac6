"""The sampling settings of one call, validated; torch-free so that the gateway checks a caller's
values with the same rules as the engine."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

from vitaserve.lmtext.config import GenerationDefaults

# Ranges of the caller-settable values (see SamplingParams.validated).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
MAX_TOP_K = 1 << 20


def _check_range(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")


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
        """Every value finite and in a range where fp32 sampling stays finite. A temperature of
        1e-45 (a float32 subnormal) passes `> 0` but turns logits into inf and the probabilities
        into NaN, so the bounds are ranges, not signs (vLLM also floors temperature at 0.01)."""
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        # greedy ignores temperature, so 0 (many clients' way of saying greedy) is fine there
        _check_range("temperature", self.temperature, MIN_TEMPERATURE if self.do_sample else 0.0, MAX_TEMPERATURE)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_range("repetition_penalty", self.repetition_penalty, MIN_PENALTY, MAX_PENALTY)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off), got {self.top_k!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        return self
