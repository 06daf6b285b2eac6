"""What one decoder stream carries between chunks, as plain tensors and ints (Redis-safe bytes).

Official incremental mode (GLM-4-Voice `token2wav` driven as its web demo does):
  prompt_tokens      every token decoded so far (the flow prompt of the next block)
  prompt_mel         [80, M] the mels that token2wav RETURNED so far, concatenated (the prompt mel;
                     deliberately not aligned with prompt_tokens, as in the web demo)
  mel_overlap        [80, 34] the held-back tail, cross-faded into the next block (or [80, 0])
  hift_cache_mel     [80, 1] last vocoded frame, prepended to the next block (or [80, 0])
  hift_cache_source  [256] last source samples, continuing the sine phases (or [0])
VITA-Audio re-decode mode keeps only prompt_tokens (all tokens since the last reset) and counters.

Randomness: `seeding="per_block"` re-seeds the stream's generator with `seed` before every flow
call, as the official code does with the global RNG (torch.manual_seed(42) in ConditionalCFM), so
the stored generator state is empty; `"per_stream"` seeds once and carries the state (5056 bytes on
CPU). With `deterministic` every draw is zero and no generator exists.

Size (fp32 prompt mel): ~27.6 KB per second of speech (86.13 frames x 80 x 4 B) + 50 B/s of
tokens (int32), plus a fixed ~14 KB (overlap 10.9 KB, HiFT cache 1.3 KB, embedding, header) and 5 KB more
for a carried CPU generator. Measured: 58 KB after a 25-token first block, 279 KB at 10 s,
555 KB at 20 s; a 60 s answer is ~1.7 MB.

Format: safetensors bytes; scalars in its `__metadata__` (format "vitaserve.decoder_stream",
version 1). Never pickle: bytes from Redis are data, not code. This version is of the bytes; the
Redis record around them (state_store.py, one hash with the previous state too) has its own schema.
to_bytes/from_bytes take milliseconds per MB of state: the store runs them in a worker thread.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "vitaserve.decoder_stream"
VERSION = 1
MODES = ("official", "vita_redecode")
SEEDINGS = ("per_block", "per_stream")
N_MELS = 80


class StreamStateError(ValueError):
    """Bytes that are not a decoder stream state of a version this code reads."""


def _empty_f(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float32)


@dataclass
class DecoderStreamState:
    mode: str = "official"
    deterministic: bool = False
    seed: int = 42
    seeding: str = "per_block"
    embedding: torch.Tensor = field(default_factory=lambda: _empty_f(1, 192))  # speaker x-vector
    prompt_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    prompt_mel: torch.Tensor = field(default_factory=lambda: _empty_f(N_MELS, 0))
    mel_overlap: torch.Tensor = field(default_factory=lambda: _empty_f(N_MELS, 0))
    hift_cache_mel: torch.Tensor = field(default_factory=lambda: _empty_f(N_MELS, 0))
    hift_cache_source: torch.Tensor = field(default_factory=lambda: _empty_f(0))
    rng_state: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))
    phase_rng_state: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))
    rng_device: str = "cpu"  # device type of the generator whose state rng_state is
    blocks_done: int = 0  # chunks that produced a decode
    samples_out: int = 0  # samples returned so far
    finalized: bool = False
    # VITA-Audio re-decode mode only
    decoded_tokens: int = 0  # len(tokens) at the last re-decode (past_audio_token_len)
    decoded_samples: int = 0  # its waveform length (past_tts_speech_len)
    next_ode_steps: int = 1  # 1 for the first chunk, then +2 per chunk up to 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise StreamStateError(f"unknown stream mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.seeding not in SEEDINGS:
            raise StreamStateError(f"unknown seeding {self.seeding!r}; choose one of {', '.join(SEEDINGS)}")

    _TENSORS = ("embedding", "prompt_tokens", "prompt_mel", "mel_overlap", "hift_cache_mel",
                "hift_cache_source", "rng_state", "phase_rng_state")
    _SCALARS = {"mode": str, "deterministic": bool, "seed": int, "seeding": str, "rng_device": str,
                "blocks_done": int, "samples_out": int, "finalized": bool, "decoded_tokens": int,
                "decoded_samples": int, "next_ode_steps": int}

    @property
    def tokens_done(self) -> int:
        return int(self.prompt_tokens.numel())

    def copy(self) -> "DecoderStreamState":
        """A deep copy (tensors cloned): states are values, a chunk never mutates its input."""
        return replace(self, **{k: getattr(self, k).clone() for k in self._TENSORS})

    def to_bytes(self) -> bytes:
        tensors = {k: getattr(self, k).detach().to("cpu").contiguous() for k in self._TENSORS}
        tensors["prompt_mel"] = tensors["prompt_mel"].to(torch.float32)
        meta = {"format": FORMAT, "version": str(VERSION)}
        meta.update({k: json.dumps(getattr(self, k)) for k in self._SCALARS})
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "DecoderStreamState":
        meta = _read_metadata(data)
        if meta.get("format") != FORMAT:
            raise StreamStateError(f"not a decoder stream state (format {meta.get('format')!r})")
        if meta.get("version") != str(VERSION):
            raise StreamStateError(f"decoder stream state version {meta.get('version')} != {VERSION} (this code)")
        try:
            tensors = st_load(bytes(data))
            scalars = {k: typ(json.loads(meta[k])) for k, typ in cls._SCALARS.items()}
        except (KeyError, ValueError) as exc:
            raise StreamStateError(f"corrupt decoder stream state: {exc}") from None
        missing = [k for k in cls._TENSORS if k not in tensors]
        if missing:
            raise StreamStateError(f"decoder stream state lacks tensors: {', '.join(missing)}")
        state = cls(**scalars, **{k: tensors[k] for k in cls._TENSORS})
        state.validate()
        return state

    def validate(self) -> None:
        """Shapes that the decoder relies on; raises StreamStateError naming the field."""
        checks = [
            ("embedding", self.embedding.dim() == 2 and self.embedding.shape[0] == 1),
            ("prompt_tokens", self.prompt_tokens.dim() == 1),
            ("prompt_mel", self.prompt_mel.dim() == 2 and self.prompt_mel.shape[0] == N_MELS),
            ("mel_overlap", self.mel_overlap.dim() == 2 and self.mel_overlap.shape[0] == N_MELS),
            ("hift_cache_mel", self.hift_cache_mel.dim() == 2 and self.hift_cache_mel.shape[0] == N_MELS),
            ("hift_cache_source", self.hift_cache_source.dim() == 1),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise StreamStateError(f"decoder stream state has mis-shaped {', '.join(bad)}")


def _read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise StreamStateError("decoder stream state is too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise StreamStateError("decoder stream state header is truncated")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        raise StreamStateError("decoder stream state header is not JSON") from None
    return header.get("__metadata__") or {}
