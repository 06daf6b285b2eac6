"""Random-weight checkpoint folders in the official formats: written for `make-checkpoint`, made once
and reused by `up`, `loadtest --local` and the tests.

A folder is written under a hidden partial name and renamed when complete, so an interrupted write
never passes for a checkpoint the next time (the rename is atomic within one filesystem).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PARTS = ("lm", "tokenizer", "decoder")
PRESETS = ("tiny", "mini", "7b")
# The speech codec has two sizes: tiny (tests) and released (benchmarks). The mini LM is the
# CPU benchmark shape, so it comes with the released codec sizes, as 7b does.
CODEC_PRESET = {"tiny": "tiny", "mini": "released", "7b": "released"}


class CheckpointWriteError(OSError):
    """A checkpoint folder could not be written; the message names the folder and why."""


@dataclass(frozen=True)
class CheckpointSet:
    """The three folders a cluster is started from."""

    lm: Path
    tokenizer: Path
    decoder: Path

    @classmethod
    def under(cls, root: Path) -> "CheckpointSet":
        return cls(root / "lm", root / "tokenizer", root / "decoder")


def write_part(folder: Path, part: str, preset: str, seed: int = 0) -> Path:
    """Write one part (lm, tokenizer or decoder) of `preset` into `folder` (in place)."""
    if part == "lm":
        from vitaserve.generator.checkpoint import write_lm_checkpoint

        return write_lm_checkpoint(folder, preset, seed=seed)
    if part == "tokenizer":
        from vitaserve.encoder.checkpoint import write_tokenizer_checkpoint

        return write_tokenizer_checkpoint(folder, CODEC_PRESET[preset], seed=seed)
    if part == "decoder":
        from vitaserve.decoder.checkpoint import write_decoder_checkpoint

        return write_decoder_checkpoint(folder, CODEC_PRESET[preset], seed=seed)
    raise ValueError(f"unknown checkpoint part {part!r}; choose one of {', '.join(PARTS)}")


def ensure_checkpoints(root: Path, preset: str = "tiny", seed: int = 0, parts: Iterable[str] = PARTS,
                       progress: Callable[[str], None] = lambda msg: None) -> CheckpointSet:
    """root/{lm,tokenizer,decoder}: the `parts` that are missing are written (each atomically),
    those already there are reused. CheckpointWriteError if root cannot be written."""
    root = Path(root)
    for part in parts:
        final = root / part
        if final.exists():
            continue
        progress(f"making the {preset} {part} checkpoint in {final} ...")
        partial = root / f".{part}.partial"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            write_part(partial, part, preset, seed)
            partial.rename(final)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot write the {preset} checkpoints into {root}: "
                                       f"{exc.strerror or exc}") from None
    return CheckpointSet.under(root)
