"""One answer: generation streamed from Triton, cut into blocks, decoded, sent as audio.

Generation and decoding overlap: a producer reads tokens (text deltas go out at once, audio tokens
fill the chunker) and a consumer decodes full blocks in order and sends them in the caller's codec.
Cancelling the answer (barge-in) cancels both: the Triton stream and the decoder call in flight.
What was actually delivered is tracked, so the history records only what the caller heard.
A text-only answer (a transcription) has no output format: its audio tokens are counted, not decoded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vitaserve.common.audio_facts import DECODER_RATE
from vitaserve.common.resample import StreamResampler
from vitaserve.gateway.chunker import TokenChunker
from vitaserve.gateway.codecs import BYTES_PER_SAMPLE, OutputFormat, encode_audio
from vitaserve.gateway.generator_client import GenerationOptions
from vitaserve.lmtext.detokenize import TextStream

if TYPE_CHECKING:
    from vitaserve.gateway.deps import GatewayDeps


# The largest audio payload of one AudioChunk. A decoder block can hold up to 400 tokens (32 s of
# speech), 3 MB of PCM16 at 48 kHz: over the gateway's 1 MiB message limit, so a block's audio goes out
# in pieces. 64 KiB (0.68 s of PCM16 at 48 kHz, 8.2 s of G.711) leaves the 1 MiB limit far above a
# piece plus its few dozen bytes of message fields, and bounds what a call holds for a stalled reader:
# its Outbox keeps at most 64 messages, so at most 64 x 64 KiB = 4 MiB of audio.
MAX_AUDIO_CHUNK_BYTES = 64 * 1024


def audio_pieces(payload: bytes, bytes_per_sample: int, limit: int = MAX_AUDIO_CHUNK_BYTES) -> list[bytes]:
    """`payload` cut into consecutive pieces of at most `limit` bytes, each a whole number of samples;
    joined they are `payload` again. Each piece is one AudioChunk, numbered on (seq) like any other."""
    step = limit - limit % bytes_per_sample
    return [payload[i : i + step] for i in range(0, len(payload), step)]


@dataclass
class AnswerProgress:
    """What happened so far; readable after a cancellation too."""

    generated: list[int] = field(default_factory=list)
    delivered_upto: int = 0  # generated[:delivered_upto] reached the caller (text, and audio heard)
    text: str = ""
    audio_tokens: int = 0
    text_tokens: int = 0
    chunks_sent: int = 0
    audio_sent_s: float = 0.0
    played_s: float | None = None  # the caller's latest PlaybackProgress of this answer; None: no report
    played_at: float | None = None  # perf_counter() when that report came
    # perf_counter() instants of the first of each; None until they happen
    first_token_at: float | None = None
    first_block_at: float | None = None
    first_audio_at: float | None = None
    first_text_at: float | None = None
    first_decode_ms: float | None = None

    def playback_slack_s(self, now: float) -> float:
        """Audio the caller has yet to play at `now`, if playback started at the first chunk and never
        stalled (a stalled caller has more, so this never overstates it); 0 before any audio."""
        if self.first_audio_at is None:
            return 0.0
        return max(0.0, self.first_audio_at + self.audio_sent_s - now)


@dataclass
class AnswerSinks:
    text: Callable[[str], Awaitable[None]]
    audio: Callable[[bytes, int, float], Awaitable[None]]  # (payload, seq, duration s)


async def speak(deps: GatewayDeps, prompt_ids: list[int], opts: GenerationOptions, fmt: OutputFormat | None,
                sinks: AnswerSinks, progress: AnswerProgress, stream_prefix: str = "") -> AnswerProgress:
    """Run one answer to its end (or until cancelled); fills `progress` as it goes.
    fmt None: text only, the audio tokens are counted and never decoded."""
    vocab, stream_id = deps.vocab, f"{stream_prefix or 'tts'}:{uuid.uuid4().hex}"
    text_stream = TextStream(deps.text_tokenizer, vocab.endoftext_id)
    chunker = TokenChunker(deps.settings.chunk_plan)
    blocks: asyncio.Queue[tuple[list[int], bool, int]] = asyncio.Queue()  # at most max_new_tokens of them

    async def produce() -> None:
        async for token in deps.generator.generate(prompt_ids, opts):
            progress.generated.append(token.token_id)
            if progress.first_token_at is None:
                progress.first_token_at = time.perf_counter()
            if token.is_audio:
                progress.audio_tokens += 1
                block = chunker.push(vocab.audio_index(token.token_id)) if fmt is not None else None
                if block:
                    if progress.first_block_at is None:
                        progress.first_block_at = time.perf_counter()
                    await blocks.put((block, False, len(progress.generated)))
            elif token.token_id < vocab.endoftext_id:
                progress.text_tokens += 1
                delta = text_stream.push(token.token_id)
                if delta:
                    await _send_text(delta)
        tail = text_stream.flush()
        if tail:
            await _send_text(tail)
        if fmt is not None:
            await blocks.put((chunker.flush(), True, len(progress.generated)))

    async def _send_text(delta: str) -> None:
        progress.text += delta
        if progress.first_text_at is None:
            progress.first_text_at = time.perf_counter()
        await sinks.text(delta)
        if progress.audio_tokens == 0:  # text before any audio is delivered as it goes out
            progress.delivered_upto = len(progress.generated)

    async def consume(fmt: OutputFormat) -> None:
        out_resampler = StreamResampler(DECODER_RATE, fmt.sample_rate)
        seq = 0
        try:
            while True:
                block, final, upto = await blocks.get()
                if final and not block and seq == 0:
                    break  # an answer without audio: nothing to decode
                t = time.perf_counter()
                pcm = await deps.decoder.decode_block(stream_id, seq, block, final, progress.playback_slack_s(t))
                if progress.first_decode_ms is None:
                    progress.first_decode_ms = (time.perf_counter() - t) * 1000
                pcm = out_resampler.process(pcm)
                if final:
                    pcm = np.concatenate([pcm, out_resampler.flush()])
                width = BYTES_PER_SAMPLE[fmt.codec]
                payload = encode_audio(pcm, fmt.codec, fmt.sample_rate) if pcm.size else b""
                for piece in audio_pieces(payload, width):  # a big block in several messages
                    duration = len(piece) / width / fmt.sample_rate
                    await sinks.audio(piece, progress.chunks_sent, duration)
                    if progress.first_audio_at is None:
                        progress.first_audio_at = time.perf_counter()
                    progress.chunks_sent += 1
                    progress.audio_sent_s += duration
                progress.delivered_upto = upto
                seq += 1
                if final:
                    break
        finally:
            if seq:  # finished or cut short: the decoder's stream state is of no more use
                deps.decoder.end_stream_soon(stream_id)

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            if fmt is not None:
                group.create_task(consume(fmt))
    except BaseExceptionGroup as group_error:  # the caller sees the failure itself, not a group
        raise first_leaf(group_error) from None
    progress.delivered_upto = len(progress.generated)
    return progress


def first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
