"""Token-id layout of the VITA-Audio vocabulary.

The Qwen2.5 tokenizer (text ids, then 22 special tokens starting at <|endoftext|>) is extended by
VITA-Audio with 20 special tokens (image/video/patch/audio/quad/ref/box tags, among them
<|begin_of_audio|> and <|end_of_audio|>), then <|audio_0|>..<|audio_16383|> (tokenizer_glm4voice.py).
The layout is fixed relative to <|endoftext|>, so a config.json alone (bos_token_id = <|endoftext|>)
locates the audio ids; with tokenizer files the ids are read from them and must agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitaserve.common.audio_facts import AUDIO_CODEBOOK_SIZE

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
VITA_SPECIAL_TOKENS = [
    "<|begin_of_image|>", "<|end_of_image|>", "<|context_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|context_of_video|>",
    "<|begin_of_patch|>", "<|end_of_patch|>", "<|context_of_patch|>",
    "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|begin_of_quad|>", "<|end_of_quad|>", "<|begin_of_ref|>", "<|end_of_ref|>",
    "<|begin_of_box|>", "<|end_of_box|>",
    "<|image|>", "<|video|>", "<|audio|>",
]


def audio_token(i: int) -> str:
    return f"<|audio_{i}|>"


@dataclass(frozen=True)
class AudioVocab:
    endoftext_id: int

    @property
    def im_end_id(self) -> int:
        return self.endoftext_id + 2

    @property
    def begin_of_audio_id(self) -> int:
        return self.endoftext_id + len(QWEN_SPECIAL_TOKENS) + VITA_SPECIAL_TOKENS.index("<|begin_of_audio|>")

    @property
    def end_of_audio_id(self) -> int:
        return self.begin_of_audio_id + 1

    @property
    def audio_offset(self) -> int:
        """Id of <|audio_0|>."""
        return self.endoftext_id + len(QWEN_SPECIAL_TOKENS) + len(VITA_SPECIAL_TOKENS)

    @property
    def size(self) -> int:
        """Number of real ids (config.json's vocab_size may pad beyond it)."""
        return self.audio_offset + AUDIO_CODEBOOK_SIZE

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.audio_offset + AUDIO_CODEBOOK_SIZE

    def audio_index(self, token_id: int) -> int:
        """Codebook index (0..16383) of an <|audio_N|> id."""
        if not self.is_audio(token_id):
            raise ValueError(f"token id {token_id} is not an audio token")
        return token_id - self.audio_offset

    def audio_id(self, index: int) -> int:
        if not 0 <= index < AUDIO_CODEBOOK_SIZE:
            raise ValueError(f"audio token index {index} outside [0, {AUDIO_CODEBOOK_SIZE})")
        return self.audio_offset + index

    @classmethod
    def from_config(cls, bos_token_id: int | None, vocab_size: int) -> "AudioVocab":
        if bos_token_id is None:
            raise ValueError("config.json has no bos_token_id (<|endoftext|>); cannot locate the audio ids")
        vocab = cls(bos_token_id)
        if vocab.size > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is too small for the audio ids (needs {vocab.size})")
        return vocab

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "AudioVocab":
        """Read the layout from a `tokenizers.Tokenizer` and check every anchor of it."""
        vocab = cls(tokenizer.token_to_id("<|endoftext|>"))
        checks = {
            "<|im_end|>": vocab.im_end_id,
            "<|begin_of_audio|>": vocab.begin_of_audio_id,
            "<|end_of_audio|>": vocab.end_of_audio_id,
            audio_token(0): vocab.audio_offset,
            audio_token(AUDIO_CODEBOOK_SIZE - 1): vocab.audio_offset + AUDIO_CODEBOOK_SIZE - 1,
        }
        wrong = {t: (tokenizer.token_to_id(t), want) for t, want in checks.items()
                 if tokenizer.token_to_id(t) != want}
        if wrong:
            raise ValueError(f"tokenizer ids differ from the VITA-Audio layout: {wrong}")
        return vocab
