"""Tokenizer speed: milliseconds of compute per second of 16 kHz audio (lower is better).

`vita-audio bench codec` calls `tokenizer_ms_per_audio_s`; `python -m vitaserve.encoder.benchmark
--tokenizer DIR` prints one JSON object. The cost of the encoder does not depend on what the audio
says, so a deterministic speech-like signal (a voiced tone with moving formant-ish harmonics,
syllable-rate envelope and breath noise) stands in for speech.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from vitaserve.common.audio_facts import TOKENIZER_RATE


def speech_like(seconds: float, sample_rate: int = TOKENIZER_RATE, seed: int = 0) -> np.ndarray:
    """Deterministic float32 signal with speech-like structure, peak ~0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)  # pitch contour
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2  # ~4 syllables per second
    noise = 0.05 * rng.standard_normal(t.shape)
    signal = envelope * voiced + noise
    return (0.5 * signal / np.max(np.abs(signal))).astype(np.float32)


def tokenizer_ms_per_audio_s(tokenizer, seconds: float = 5.0, repeats: int = 3, waveform: np.ndarray | None = None) -> float:
    """Median wall-clock ms per audio second of `tokenizer.encode` over `repeats` runs, after one
    uncounted warm-up run (first-call allocations, lazy init)."""
    sample_rate = tokenizer.sample_rate
    audio = speech_like(seconds, sample_rate) if waveform is None else waveform
    seconds = audio.shape[-1] / sample_rate
    tokenizer.encode([audio], sample_rate)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        tokenizer.encode([audio], sample_rate)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0 / seconds


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    import torch

    from vitaserve.encoder.tokenizer import SpeechTokenizer

    parser = argparse.ArgumentParser(description="GLM-4-Voice tokenizer speed (ms per audio second)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tokenizer = SpeechTokenizer.from_pretrained(args.tokenizer, device=args.device, dtype=getattr(torch, args.dtype))
    ms = tokenizer_ms_per_audio_s(tokenizer, args.seconds, args.repeats)
    cfg = tokenizer.model.config
    print(json.dumps({
        "tokenizer_ms_per_audio_s": round(ms, 2),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "d_model": cfg.d_model,
        "layers": cfg.num_layers,
        "params": sum(p.numel() for p in tokenizer.model.parameters()),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
