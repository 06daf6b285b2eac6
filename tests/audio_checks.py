"""Comparing audio that should be equal but for float rounding (batched vs alone)."""

from __future__ import annotations

import math

import numpy as np
import torch

MEL_SNR_DB = 90.0  # mels and everything before the vocoder: float rounding only
# PCM and the sine source of a short, whole-batch HiFT forward: the source integrates F0 over every
# sample, so an F0 that differs in its last bits drifts the phase along the signal; for blocks decoded
# through the flow, whose mel also differs by rounding, the bound grows with the block: source_snr_db
AUDIO_SNR_DB = 50.0


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


F0_REL_ERR = 1e-5  # rms relative F0 error per frame, batched vs alone: measured 1.7e-6..3.2e-6 (AMD EPYC, 1-2 threads)
F0_RMS_HZ = 100.0  # the tiny checkpoint's F0: 83 Hz rms, 306 Hz max
HARMONICS_RMS = math.sqrt(sum(h * h for h in range(1, 10)) / 9)  # 5.6: harmonic h drifts h times as far
SIGMAS = 3.0


def source_snr_db(frames: int) -> float:
    """Lowest SNR of the sine source (and of the PCM it drives) of `frames` vocoded frames, batched vs alone.

    Batched and alone mels differ by GEMM rounding (108-114 dB), so each frame's F0 differs by a
    relative ~F0_REL_ERR. SineGen integrates F0 over every sample (float32 cumsum, as official): the
    fundamental's phase at the end of the block is off by 2 pi 256/sr * sum of the per-frame F0 errors,
    a random walk over the frames (independent roundings): rms 2 pi 256/sr * sqrt(frames) * eps * F0.
    Harmonic h is off h times that; the source (tanh of a mix of sines) then differs by about
    HARMONICS_RMS * dtheta relative: SNR = -20 log10(HARMONICS_RMS * SIGMAS * dtheta). For 174 frames
    (block 1) that is 35.8 dB. Measured there: 49.2 dB at worst on the hift_cache_source (the block's
    last samples, where the drift is largest; 1 or 2 threads), matching -20 log10(4.2 * 8.6e-4 rad) =
    48.8 dB from the measured fundamental drift and this checkpoint's harmonic weights; wiring bugs
    (another row's cache source or generator) give 25 dB or less.
    """
    dtheta = 2 * math.pi * 256 / 22050 * math.sqrt(frames) * F0_REL_ERR * F0_RMS_HZ
    return -20 * math.log10(HARMONICS_RMS * SIGMAS * dtheta)
