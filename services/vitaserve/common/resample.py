"""Sample-rate conversion with soxr: one-shot, and streamed with state per call.

Streaming keeps soxr's filter state between chunks, so a call's audio converted 20 ms at a time is
the same, sample for sample, as converting the whole recording at once (tested). The price is
soxr's filter delay: the first chunks give little or nothing, and the last ~20-70 ms (quality "HQ")
come out only at `flush()`, so flush at the end of each answer, not only at the end of the call.
"""

from __future__ import annotations

import numpy as np
import soxr

QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")  # soxr's presets; "QQ" has no delay but aliases badly


class ResampleError(ValueError):
    """Bad rates, quality or samples for resampling; the message says which."""


def _check_rate(name: str, rate: int) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ResampleError(f"{name} must be a positive whole number of Hz, got {rate!r}")
    return int(rate)


def _check_quality(quality: str) -> str:
    if quality not in QUALITIES:
        raise ResampleError(f"unknown resampling quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    return quality


def _check_chunk(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ResampleError(f"audio to resample must be 1-D (mono), got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.floating):
        raise ResampleError(f"audio to resample must be float samples, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ResampleError("audio to resample contains NaN or infinite samples")
    return np.ascontiguousarray(x)


def resample(x: np.ndarray, in_rate: int, out_rate: int, quality: str = "HQ") -> np.ndarray:
    """Whole-signal conversion; float32 out, len ~= len(x) * out_rate / in_rate."""
    in_rate, out_rate = _check_rate("in_rate", in_rate), _check_rate("out_rate", out_rate)
    x = _check_chunk(x)
    quality = _check_quality(quality)
    if in_rate == out_rate or x.size == 0:
        return x.copy()
    return soxr.resample(x, in_rate, out_rate, quality=quality).astype(np.float32, copy=False)


class StreamResampler:
    """One direction of one call (caller -> 16 kHz, or 22.05 kHz -> caller): chunk in, chunk out."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ"):
        self.in_rate = _check_rate("in_rate", in_rate)
        self.out_rate = _check_rate("out_rate", out_rate)
        self.quality = _check_quality(quality)
        self._stream = None if self.in_rate == self.out_rate else soxr.ResampleStream(
            self.in_rate, self.out_rate, 1, dtype="float32", quality=self.quality)
        self.samples_in = 0
        self.samples_out = 0

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    @property
    def delay_s(self) -> float:
        """Audio held inside the filter right now, in seconds of output."""
        return 0.0 if self._stream is None else float(self._stream.delay()) / self.out_rate

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Convert the next chunk; may return fewer samples than the ratio says (filter delay)."""
        x = _check_chunk(chunk)
        self.samples_in += x.size
        out = x.copy() if self._stream is None else self._stream.resample_chunk(x, last=False)
        self.samples_out += out.size
        return out

    def flush(self) -> np.ndarray:
        """Everything still held back, then a fresh state: the same object can serve the next answer."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        self.samples_out += out.size
        return out

    def reset(self) -> None:
        """Drop held-back audio without emitting it (barge-in: the rest of the answer is discarded)."""
        if self._stream is not None:
            self._stream.clear()
