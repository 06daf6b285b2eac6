"""Streaming text detokenisation: text deltas as tokens arrive, never a broken UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding then yields U+FFFD.
Pending text ids are held until they decode cleanly (at most 4 tokens, the longest UTF-8 sequence),
then emitted and dropped, so the work per token stays constant. Special and audio ids are not text.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_MAX_PENDING = 4


class TextStream:
    def __init__(self, tokenizer: Tokenizer, first_special_id: int):
        self.tok = tokenizer
        self.first_special_id = first_special_id  # <|endoftext|>: every id from here on is not text
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        """Feed one generated id; returns the text that is now complete (often '')."""
        if token_id >= self.first_special_id:
            return ""
        self.pending.append(token_id)
        text = self.tok.decode(self.pending, skip_special_tokens=False)
        if text.endswith("\ufffd") and len(self.pending) < _MAX_PENDING:
            return ""
        self.pending.clear()
        return text

    def flush(self) -> str:
        text = self.tok.decode(self.pending, skip_special_tokens=False) if self.pending else ""
        self.pending.clear()
        return text
