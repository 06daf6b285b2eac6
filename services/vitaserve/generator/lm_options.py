"""Which LM checkpoint to load offline, and how: the flags of `vita-audio generate` and `vita-audio
bench lm|engine`, read once into one object that loads the model (shared, so neither subcommand
imports the other)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


class LMLoadError(ValueError):
    """The checkpoint cannot be loaded as asked; the message says why."""


@dataclass(frozen=True)
class LMOptions:
    lm: str                        # VITA-Audio checkpoint folder
    device: str = "cpu"            # cpu or cuda[:N]
    dtype: str | None = None       # None: float32 on cpu, bfloat16 on cuda
    max_len: int = 4096            # KV cache length per call (prompt + new tokens)
    mtp_audio_head: bool = False   # MCTP steps score only the audio rows of lm_head (changes results)

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        p.add_argument("--lm", required=True, help="VITA-Audio checkpoint folder (config.json, safetensors)")
        p.add_argument("--device", default=cls.device, help="cpu or cuda[:N] (default cpu)")
        p.add_argument("--dtype", default=cls.dtype,
                       help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")
        p.add_argument("--max-len", type=int, default=cls.max_len,
                       help="KV cache length per call (prompt + new tokens)")
        p.add_argument("--mtp-audio-head", action="store_true",
                       help="optional speed-up that CHANGES results: MCTP steps score only the 16384 audio rows "
                            "of lm_head (~10x cheaper); off by default")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LMOptions":
        return cls(lm=args.lm, device=args.device, dtype=args.dtype, max_len=args.max_len,
                   mtp_audio_head=args.mtp_audio_head)

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("float32" if self.device == "cpu" else "bfloat16")

    def load(self, num_slots: int = 1):
        """The LanguageModel with caches for `num_slots` calls; LMLoadError if the folder cannot be."""
        from vitaserve.common.checkpoint_errors import CheckpointError
        from vitaserve.generator.language_model import LanguageModel

        try:
            return LanguageModel.from_folder(self.lm, device=self.device, dtype=self.resolved_dtype,
                                             max_len=self.max_len, num_slots=num_slots,
                                             mtp_audio_head=self.mtp_audio_head)
        except (CheckpointError, ValueError, FileNotFoundError) as exc:
            raise LMLoadError(str(exc)) from exc
