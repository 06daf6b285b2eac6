"""Cutting an answer's stream of audio token ids into decoder blocks.

The decoder (GLM-4-Voice flow + HiFT) runs block by block; small first blocks give early audio, larger
later blocks give better prosody and less re-work (each block re-runs the growing flow prompt).
Sizes are in audio tokens (12.5 per second of speech), the last size repeating:

* "glm4voice": GLM-4-Voice web_demo.py's `block_size_list` = [25, 50, 100, 150, 200].
* "vita": 10, then 25, 50, 100, 150, 200. VITA-Audio's first audio chunk is the 10 tokens that the
  10 MCTP modules emit right after the first backbone forward (the paper's first-chunk latency), so
  the first block is exactly that burst; after it we take the GLM-4-Voice demo's growing sizes from
  the start, our choice: VITA-Audio's own demo re-decodes everything so far instead of using fixed
  blocks (the decoder's "vita_redecode" mode), which a block list cannot express.

A block is handed out the moment it is full (lowest latency). `flush()` at the end of the turn gives
the rest, which the caller decodes with finalize=True even when it is empty (the answer ended on a
block boundary): the decoder then vocodes the mel it held back, so the last block is always finalized.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from vitaserve.common.audio_facts import GLM4VOICE_BLOCKS, VITA_BLOCKS


class ChunkPlanError(ValueError):
    """An unusable block-size list, preset name or token; the message says which."""


@dataclass(frozen=True)
class ChunkPlan:
    sizes: tuple[int, ...]  # block sizes in audio tokens; the last one repeats

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes) if isinstance(self.sizes, (list, tuple)) else None
        if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in sizes):
            raise ChunkPlanError(f"block sizes must be a non-empty list of positive whole numbers, got {self.sizes!r}")
        object.__setattr__(self, "sizes", tuple(int(s) for s in sizes))

    def size(self, index: int) -> int:
        """Size of block number `index` (0-based)."""
        return self.sizes[min(index, len(self.sizes) - 1)]

    @classmethod
    def preset(cls, name: str) -> "ChunkPlan":
        try:
            return PRESETS[name.strip().lower()]
        except (KeyError, AttributeError):
            raise ChunkPlanError(f"unknown chunk plan {name!r}; presets: {', '.join(PRESETS)}") from None

    @classmethod
    def parse(cls, text: str) -> "ChunkPlan":
        """A preset name, or sizes written "10,25,50" (as `vita-audio decode --chunk-sizes`)."""
        text = (text or "").strip()
        if text.lower() in PRESETS:
            return PRESETS[text.lower()]
        try:
            sizes = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ChunkPlanError(
                f"chunk plan {text!r} is neither a preset ({', '.join(PRESETS)}) nor sizes like 25,50,100") from None
        return cls(sizes)


PRESETS: dict[str, ChunkPlan] = {
    "glm4voice": ChunkPlan(GLM4VOICE_BLOCKS),
    "vita": ChunkPlan(VITA_BLOCKS),
}


class TokenChunker:
    """Per-turn state: push audio token ids one by one, get whole blocks back."""

    def __init__(self, plan: ChunkPlan = PRESETS["vita"]):
        self.plan = plan
        self.blocks_out = 0  # blocks handed out so far (flush included)
        self.tokens_out = 0
        self._pending: list[int] = []

    @property
    def pending(self) -> int:
        """Tokens waiting for their block to fill."""
        return len(self._pending)

    @property
    def next_size(self) -> int:
        return self.plan.size(self.blocks_out)

    def push(self, token: int) -> list[int] | None:
        """Add one token; returns the block it completes, else None."""
        try:
            value = operator.index(token)
        except TypeError:
            raise ChunkPlanError(f"an audio token id must be a whole number, got {token!r}") from None
        if isinstance(token, bool) or value < 0:
            raise ChunkPlanError(f"an audio token id must be a non-negative whole number, got {token!r}")
        self._pending.append(value)
        if len(self._pending) < self.next_size:
            return None
        return self._take()

    def extend(self, tokens) -> list[list[int]]:
        """push() each token; returns the blocks completed, in order."""
        return [block for block in map(self.push, tokens) if block is not None]

    def flush(self) -> list[int]:
        """The end of the turn: the remaining tokens (maybe none) as the final block; then a fresh turn."""
        block = self._take()
        self.blocks_out = self.tokens_out = 0
        return block

    def _take(self) -> list[int]:
        block, self._pending = self._pending, []
        self.blocks_out += 1
        self.tokens_out += len(block)
        return block
