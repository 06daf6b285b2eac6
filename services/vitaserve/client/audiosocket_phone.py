"""A phone-like client of the gateway's Asterisk AudioSocket endpoint (--audiosocket-port), for the
load test: it plays Asterisk's part. The same call as client/phone.py's run_call, with the same
CallResult / TurnResult.

Asterisk's side of a call: the UUID frame, then 8 kHz signed-linear audio in 20 ms frames, all the
time (the caller's speech, silence in between, as a channel sends them), a hang-up frame at the end.

What AudioSocket does not carry, and how the client makes up for it:
- No turns or text: an answer is the audio that arrives; it is over when none has arrived for
  `answer_gap_s` (the gateway releases an answer in real time, so a gap that long is its end, or a
  generation too slow to keep up, which the load test counts as the turn's end too).
- No options: mode and max_new_tokens are the gateway's defaults (--mode, --max-new-tokens); the
  arguments are taken for the same signature as the other clients and ignored. No push-to-talk:
  the server's VAD ends each utterance.
- first audio: from the last frame of the utterance to the first audio frame with any sound (a
  frame of exact zeros would be filler; the gateway sends none, so this is the answer's first
  frame). The gateway releases an answer's first 200 ms at once (its outgoing queue), so pacing
  does not delay first audio; the rest arrives in real time.
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid as uuidlib

import grpc
import numpy as np

from vitaserve.client.phone import FRAME_S, CallResult, TurnResult
from vitaserve.common.resample import resample
from vitaserve.gateway.adapters import audiosocket as wire
from vitaserve.gateway.codecs import encode_audio

RATE = wire.SAMPLE_RATE
FRAME = int(RATE * FRAME_S)  # samples in a 20 ms frame


async def run_audiosocket_call(host: str, port: int, utterances: list[np.ndarray], rate: int, mode: str = "",
                               push_to_talk: bool = False, max_new_tokens: int = 0, turn_timeout_s: float = 120.0,
                               barge_in: list[bool] | None = None, session_uuid: str | None = None,
                               answer_gap_s: float = 2.0, silence_s: float = 1.0) -> CallResult:
    """One call with one turn per utterance (float samples at `rate`) to host:port. barge_in[i]: the
    caller starts the next utterance as soon as the first audio of answer i arrives. session_uuid:
    the stream's UUID (a new one when None); the same UUID again resumes the session.
    mode, push_to_talk and max_new_tokens are not in the protocol (see the module docstring)."""
    del mode, push_to_talk, max_new_tokens
    stream_uuid = uuidlib.UUID(session_uuid) if session_uuid else uuidlib.uuid4()
    result = CallResult(session_id=stream_uuid.hex)
    barge_in = barge_in or [False] * len(utterances)
    speech = [resample(np.asarray(u, np.float32), rate, RATE) if rate != RATE else np.asarray(u, np.float32)
              for u in utterances]
    # audio arriving while the caller speaks is the end of the answer it talked over (the gateway's
    # queue), not the next answer: it goes to the previous turn
    state: dict = {"turn": None, "previous": None, "speaking": False, "t_end": None, "last_audio": None}
    first_audio = asyncio.Event()
    reader, writer = await asyncio.open_connection(host, port)
    loop = asyncio.get_running_loop()

    async def send_paced(samples: np.ndarray, until: asyncio.Event | None = None) -> None:
        """20 ms frames in real time; with `until`, silence after `samples` until it is set."""
        start = loop.time()
        i = 0
        while i * FRAME < len(samples) or (until is not None and not until.is_set()):
            piece = samples[i * FRAME:(i + 1) * FRAME]
            if len(piece) < FRAME:
                piece = np.concatenate([piece, np.zeros(FRAME - len(piece), np.float32)])
            writer.write(wire.frame(wire.KIND_AUDIO, encode_audio(piece, "pcm16", RATE)))
            await writer.drain()
            i += 1
            await asyncio.sleep(max(0.0, start + i * FRAME_S - loop.time()))

    def since_end() -> float:
        return (time.perf_counter() - state["t_end"]) * 1000 if state["t_end"] else 0.0

    async def receive() -> None:
        parser = wire.FrameParser(max_payload=0xFFFF)
        while data := await reader.read(16 * 1024):
            for frame in parser.feed(data):
                if frame.kind == wire.KIND_ERROR:
                    code = frame.payload[0] if frame.payload else grpc.StatusCode.UNKNOWN.value[0]
                    result.status = next((s.name for s in grpc.StatusCode if s.value[0] == code), str(code))
                    result.details = frame.payload[1:].decode(errors="replace")
                    return
                if frame.kind == wire.KIND_HANGUP:
                    return
                turn: TurnResult | None = state["previous" if state["speaking"] else "turn"]
                if frame.kind != wire.KIND_AUDIO or turn is None:
                    continue
                if not state["speaking"] and any(frame.payload):  # the adapter's filler silence is no answer
                    state["last_audio"] = time.perf_counter()
                if turn.first_audio_ms is None and not state["speaking"]:
                    if not any(frame.payload):
                        continue  # filler silence, not the answer
                    turn.first_audio_ms = since_end()
                    first_audio.set()
                duration = len(frame.payload) / wire.BYTES_PER_S
                turn.audio += frame.payload
                turn.audio_s += duration
                turn.chunks += 1
                turn.chunk_arrivals.append(since_end() / 1000)
                turn.chunk_durations.append(duration)

    async def answer_over(turn: TurnResult) -> None:
        """Until the answer's audio stopped for answer_gap_s (the first frame must come first)."""
        await first_audio.wait()
        while time.perf_counter() - state["last_audio"] < answer_gap_s:
            await asyncio.sleep(0.05)
        turn.ended_at = time.monotonic()

    async def speak() -> None:
        for n, utterance in enumerate(speech, start=1):
            first_audio.clear()
            state["previous"], state["speaking"] = state["turn"], True
            state["turn"] = turn = TurnResult(turn=n, started_at=time.monotonic())
            await send_paced(utterance)
            state["t_end"], state["speaking"] = time.perf_counter(), False
            done = asyncio.Event()
            silence = asyncio.create_task(send_paced(np.zeros(int(silence_s * RATE), np.float32), until=done))
            try:
                interrupt = barge_in[n - 1] and n < len(speech)
                await asyncio.wait_for(first_audio.wait() if interrupt else answer_over(turn), turn_timeout_s)
                turn.interrupted = interrupt
                turn.ended_at = turn.ended_at or time.monotonic()
            finally:
                done.set()
                await silence
            result.turns.append(turn)

    try:
        writer.write(wire.frame(wire.KIND_UUID, stream_uuid.bytes))
        receiver = asyncio.create_task(receive())
        speaker = asyncio.create_task(speak())
        await asyncio.wait({speaker, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if speaker.done() and isinstance(speaker.exception(), asyncio.TimeoutError):
            result.status, result.details = "DEADLINE_EXCEEDED", f"no answer within {turn_timeout_s:.0f} s"
        elif receiver.done() and result.status == "OK" and not speaker.done():
            result.status, result.details = "UNAVAILABLE", "the gateway closed the call"
        speaker.cancel()
        await asyncio.gather(speaker, return_exceptions=True)
        if not receiver.done():
            writer.write(wire.HANGUP_FRAME)
            await writer.drain()
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
    except (ConnectionError, struct.error) as exc:
        result.status, result.details = "UNAVAILABLE", repr(exc)
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    return result
