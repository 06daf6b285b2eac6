"""Comparing audio that should be equal but for float rounding (batched vs alone)."""

from __future__ import annotations

import numpy as np
import torch

MEL_SNR_DB = 90.0  # mels and everything before the vocoder: float rounding only
AUDIO_SNR_DB = 50.0  # PCM and the sine source: the source integrates F0 (a cumulative sum over every
# sample), so an F0 that differs in its last bits drifts the phase along the block; measured 61-85 dB


def assert_close_snr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, what: str,
                     min_snr_db: float) -> None:
    """a equals b but for rounding: the error is at least min_snr_db below b's energy."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} != {b.shape}"
    if a.size == 0:
        return
    signal, error = float(np.sum(b * b)), float(np.sum((a - b) ** 2))
    assert signal > 0, f"{what}: the reference is all zeros"
    snr = 10 * np.log10(signal / error) if error > 0 else np.inf
    assert snr >= min_snr_db, f"{what}: batched differs from alone at {snr:.1f} dB SNR (< {min_snr_db} dB)"
