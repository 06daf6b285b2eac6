"""Real test utterances: spoken by espeak-ng once, cached, trimmed to their last voiced sample."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

from vitaserve.common.resample import resample
from vitaserve.common.wav import read_wav

QUESTIONS = [
    "Hello! What is the weather like in Paris today?",
    "Can you book a table for two at seven tonight?",
    "What time does the pharmacy on Main Street close?",
    "Please remind me to call my sister tomorrow morning.",
]


def trim_silence(x: np.ndarray, rate: int, threshold: float = 0.01) -> np.ndarray:
    """Cut leading and trailing near-silence, so the utterance ends on its last voiced sample: the
    instant first-audio latency is measured from."""
    frame = max(1, rate // 100)
    energy = np.array([np.sqrt(np.mean(x[i : i + frame] ** 2)) for i in range(0, len(x), frame)])
    voiced = np.nonzero(energy > threshold)[0]
    if voiced.size == 0:
        raise ValueError("the utterance is silent")
    return x[voiced[0] * frame : (voiced[-1] + 1) * frame]


def utterances(rate: int, cache: Path, texts: list[str] = QUESTIONS) -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (scripts/setup.sh installs it)")
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for text in texts:
        path = cache / f"{hashlib.sha1(text.encode()).hexdigest()[:12]}.wav"
        if not path.exists():
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        audio, file_rate = read_wav(path)
        out.append(trim_silence(resample(np.ascontiguousarray(audio[0]), file_rate, rate), rate))
    return out
