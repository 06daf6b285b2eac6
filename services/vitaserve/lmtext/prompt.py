"""Prompts in the official chat format for the three tasks VITA-Audio was trained on.

The official code renders Qwen2's ChatML template (evaluation/get_chat_template.py, no default system
message) with add_generation_prompt: each message is "<|im_start|>{role}\n{content}<|im_end|>\n", then
"<|im_start|>assistant\n". Audio enters as "<|begin_of_audio|><|audio_i|>...<|end_of_audio|>".
Tasks (tools/inference_sts.py): spoken QA with the "Luke" system message and user content
"\n" + audio; ASR with no system message and "Convert the speech to text.\n" + audio; TTS with
"Convert the text to speech.\n" + text. Earlier assistant turns are kept as the ids the model
generated (text and audio), so history never goes through a lossy re-tokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

from vitaserve.lmtext.vocab import AUDIO_CODEBOOK_SIZE, audio_token

LUKE_SYSTEM = "Your Name: Luke\nYour Gender: male\n\nRespond in a text-audio interleaved manner."
ASR_INSTRUCTION = "Convert the speech to text."
TTS_INSTRUCTION = "Convert the text to speech."


def audio_span(tokens: list[int]) -> str:
    bad = [t for t in tokens if not 0 <= t < AUDIO_CODEBOOK_SIZE]
    if bad:
        raise ValueError(f"audio token(s) outside [0, {AUDIO_CODEBOOK_SIZE}): {bad[:8]}")
    return "<|begin_of_audio|>" + "".join(audio_token(t) for t in tokens) + "<|end_of_audio|>"


class PromptTooLong(ValueError):
    """The parts of a prompt that cannot be dropped do not fit the context."""


@dataclass
class Turn:
    """One finished exchange: the user's audio tokens and what the assistant generated (ids)."""

    user_audio: list[int]
    assistant_ids: list[int] = field(default_factory=list)


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.im_end = tokenizer.token_to_id("<|im_end|>")

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def message(self, role: str, content: str) -> list[int]:
        return self._encode(f"<|im_start|>{role}\n{content}<|im_end|>\n")

    def assistant_turn(self, ids: list[int]) -> list[int]:
        ids = ids[:-1] if ids and ids[-1] == self.im_end else ids
        return self._encode("<|im_start|>assistant\n") + list(ids) + self._encode("<|im_end|>\n")

    def generation_prompt(self) -> list[int]:
        return self._encode("<|im_start|>assistant\n")

    def spoken_qa(self, user_audio: list[int], history: list[Turn] = (), system: str | None = LUKE_SYSTEM,
                  max_tokens: int | None = None) -> list[int]:
        """Speech-to-speech dialogue: earlier turns, then the caller's new utterance.

        With max_tokens (the context less the answer's max_new_tokens), the system prompt and the
        newest whole turns that fit are kept, as chat servers do; PromptTooLong when not even the
        system prompt and the new utterance fit."""
        head = self.message("system", system) if system else []
        tail = self.message("user", "\n" + audio_span(user_audio)) + self.generation_prompt()
        turns = [self.message("user", "\n" + audio_span(t.user_audio)) + self.assistant_turn(t.assistant_ids)
                 for t in history]
        if max_tokens is not None:
            room = max_tokens - len(head) - len(tail)
            if room < 0:
                raise PromptTooLong(f"the system prompt and the utterance take {len(head) + len(tail)} tokens, "
                                    f"over the {max_tokens} the context leaves for a prompt")
            kept = 0
            for t in reversed(turns):
                if len(t) > room:
                    break
                room -= len(t)
                kept += 1
            turns = turns[len(turns) - kept:]
        return head + [i for t in turns for i in t] + tail

    def asr(self, user_audio: list[int]) -> list[int]:
        return self.message("user", f"{ASR_INSTRUCTION}\n{audio_span(user_audio)}") + self.generation_prompt()

    def tts(self, text: str) -> list[int]:
        if not text.strip():
            raise ValueError("nothing to synthesise: the text is empty")
        return self.message("user", f"{TTS_INSTRUCTION}\n{text}") + self.generation_prompt()
