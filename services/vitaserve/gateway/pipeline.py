"""The one path from a caller's audio or text to an answer: encode -> prompt -> speak.

Converse runs all three steps per turn (with the call's history in the prompt), Synthesize starts
at the prompt (text to speak), Transcribe stops at text (an ASR prompt, a text-only answer). Each
step that is CPU work (resampling, building a prompt) runs in a worker thread.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from vitaserve.common.audio_facts import TOKENIZER_RATE
from vitaserve.common.resample import resample
from vitaserve.gateway.answer import AnswerProgress, AnswerSinks, speak
from vitaserve.gateway.codecs import OutputFormat
from vitaserve.gateway.convert import CallError
from vitaserve.gateway.deps import GatewayDeps
from vitaserve.gateway.generator_client import GenerationOptions
from vitaserve.lmtext.prompt import Turn


async def _no_text(_: str) -> None:
    return None


async def _no_audio(_: bytes, __: int, ___: float) -> None:
    return None


class AnswerPipeline:
    def __init__(self, deps: GatewayDeps):
        self.deps = deps

    # ---- encode ----------------------------------------------------------------------------------
    async def encode(self, samples: np.ndarray, rate: int = TOKENIZER_RATE) -> list[int]:
        """Speech at `rate` -> audio token ids (the encoder takes TOKENIZER_RATE)."""
        if rate != TOKENIZER_RATE:
            samples = await asyncio.to_thread(resample, samples, rate, TOKENIZER_RATE)
        return await self.deps.encoder.encode(samples)

    # ---- prompt ----------------------------------------------------------------------------------
    async def spoken_qa_prompt(self, user_tokens: list[int], history: list[Turn], system: str | None,
                               max_tokens: int) -> list[int]:
        """A turn of a call: the newest whole turns of `history` that fit in max_tokens (PromptTooLong if
        not even the turn does)."""
        return await asyncio.to_thread(self.deps.prompts.spoken_qa, user_tokens, history, system, max_tokens)

    async def tts_prompt(self, text: str, max_new_tokens: int) -> list[int]:
        prompt = await asyncio.to_thread(self.deps.prompts.tts, text)
        context = self.deps.settings.context_tokens
        if len(prompt) + max_new_tokens > context:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the text ({len(prompt)} tokens) and max_new_tokens ({max_new_tokens}) exceed "
                            f"the context of {context} tokens: shorten one of them")
        return prompt

    async def asr_prompt(self, user_tokens: list[int]) -> list[int]:
        return await asyncio.to_thread(self.deps.prompts.asr, user_tokens)

    # ---- speak -----------------------------------------------------------------------------------
    async def speak(self, prompt: list[int], opts: GenerationOptions, fmt: OutputFormat, sinks: AnswerSinks,
                    progress: AnswerProgress, stream_prefix: str = "") -> AnswerProgress:
        """The answer as text deltas and audio chunks in `fmt`, through `sinks`, until it ends or is cancelled."""
        return await speak(self.deps, prompt, opts, fmt, sinks, progress, stream_prefix)

    async def text(self, prompt: list[int], opts: GenerationOptions) -> str:
        """The answer's text only (a transcription): its audio tokens, if any, are not decoded."""
        progress = await speak(self.deps, prompt, opts, None, AnswerSinks(_no_text, _no_audio), AnswerProgress())
        return progress.text
