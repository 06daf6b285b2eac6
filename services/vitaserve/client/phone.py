"""A phone-like client of the Conversation service: real-time 20 ms frames out, everything in.

`run_call` is what `vita-audio call` and the load test use: it sends one utterance per turn, paced
as a caller speaks, then silence (the server's VAD ends the utterance) or END_OF_UTTERANCE, waits for
the answer, and hangs up. Latency is measured here, at the caller: from the last frame of the
utterance to the first audio chunk.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from vitaserve.api import audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.common.channel_options import caller_options
from vitaserve.common.tls import ClientTls, secure_or_insecure_channel
from vitaserve.gateway.codecs import CODEC_ENUM, check_format, encode_audio

FRAME_S = 0.02


@dataclass
class TurnResult:
    turn: int
    first_audio_ms: float | None = None  # caller side: last utterance frame -> first audio chunk
    first_text_ms: float | None = None
    audio: bytearray = field(default_factory=bytearray)  # in the call's codec
    audio_s: float = 0.0
    chunks: int = 0
    chunk_arrivals: list[float] = field(default_factory=list)  # seconds after the utterance ended
    chunk_durations: list[float] = field(default_factory=list)
    text: str = ""
    server_timings: dict = field(default_factory=dict)  # TurnTimings fields, ms
    mode: str = ""  # as the server ran it
    text_tokens: int = 0
    audio_tokens: int = 0
    interrupted: bool = False
    error: str = ""
    started_at: float = 0.0  # time.monotonic() at the utterance's first frame, and when the turn ended
    ended_at: float = 0.0


@dataclass
class CallResult:
    session_id: str = ""
    resumed: bool = False
    turns_before: int = 0  # turns the session had before this connection (a resumed call)
    turns: list[TurnResult] = field(default_factory=list)
    status: str = "OK"
    details: str = ""


async def run_call(target: str, utterances: list[np.ndarray], rate: int, codec: str = "mulaw", mode: str = "",
                   push_to_talk: bool = False, silence_s: float = 1.0, max_new_tokens: int = 0,
                   greedy: bool | None = None, turn_timeout_s: float = 120.0,
                   barge_in: list[bool] | None = None, session_id: str = "", hang_up: bool = True,
                   tls: ClientTls | None = None, metadata: tuple[tuple[str, str], ...] = ()) -> CallResult:
    """One call with one turn per utterance (float samples at `rate`). barge_in[i]: the caller starts
    the next utterance as soon as the first audio of answer i arrives (talking over it). session_id:
    resume that call (its history continues; turn numbers go on from its turns so far). hang_up
    False: close the stream without HANG_UP, so that the call can be resumed later. tls: call a gateway
    serving TLS, trusting tls.ca_file. metadata: the caller's credentials, e.g. (("x-api-key", key),)."""
    codec = check_format(codec, rate)
    frame = int(rate * FRAME_S)
    result = CallResult()
    outbox: asyncio.Queue = asyncio.Queue()
    turn_done = asyncio.Event()
    first_audio = asyncio.Event()
    started = asyncio.Event()  # SessionStarted arrived: the gateway took the call
    state = {"turn": None, "t_end": None}
    by_turn: dict[int, TurnResult] = {}
    barge_in = barge_in or [False] * len(utterances)
    sampling = audio_pb2.SamplingOptions(greedy=greedy) if greedy is not None else audio_pb2.SamplingOptions()
    fmt = audio_pb2.AudioFormat(codec=CODEC_ENUM[codec], sample_rate=rate)
    await outbox.put(pb.ConverseRequest(config=pb.CallConfig(
        input_format=fmt, mode=mode, push_to_talk=push_to_talk, max_new_tokens=max_new_tokens, sampling=sampling,
        session_id=session_id)))

    async def requests():
        while (msg := await outbox.get()) is not None:
            yield msg

    async def send_paced(samples: np.ndarray) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, offset in enumerate(range(0, len(samples), frame)):
            await outbox.put(pb.ConverseRequest(audio=pb.AudioFrame(data=encode_audio(
                samples[offset : offset + frame], codec, rate))))
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_S - loop.time()))

    async def speak() -> None:
        # Audio only once the call is accepted: a refused call (credentials, limits) then ends with the
        # gateway's status, not with INTERNAL from our own gRPC core writing into a closed stream.
        await asyncio.wait_for(started.wait(), turn_timeout_s)
        for n, utterance in enumerate(utterances, start=1):
            turn_done.clear()
            first_audio.clear()
            state["turn"] = by_turn[n] = TurnResult(turn=n, started_at=time.monotonic())
            await send_paced(utterance)
            state["t_end"] = time.perf_counter()
            if push_to_talk:
                await outbox.put(pb.ConverseRequest(control=pb.Control(action=pb.Control.END_OF_UTTERANCE)))
            silence = asyncio.create_task(send_paced(np.zeros(int(silence_s * rate), np.float32)))
            interrupt = barge_in[n - 1] and n < len(utterances)
            await asyncio.wait_for((first_audio if interrupt else turn_done).wait(), turn_timeout_s)
            silence.cancel()
            state["turn"].ended_at = time.monotonic()
            result.turns.append(state["turn"])
        if hang_up:
            await outbox.put(pb.ConverseRequest(control=pb.Control(action=pb.Control.HANG_UP)))
        await outbox.put(None)

    def since_end() -> float:
        return (time.perf_counter() - state["t_end"]) * 1000 if state["t_end"] else 0.0

    async def receive(call) -> None:
        async for msg in call:
            kind = msg.WhichOneof("message")
            number = getattr(getattr(msg, kind), "turn", None) if kind != "session_started" else None
            local = None if number is None else number - result.turns_before  # server turns go on after a resume
            turn: TurnResult | None = by_turn.get(local, state["turn"])
            if kind == "session_started":
                result.session_id = msg.session_started.session_id
                result.resumed, result.turns_before = msg.session_started.resumed, msg.session_started.turns_so_far
                started.set()
            elif turn is None:
                continue
            elif kind == "audio":
                if turn.first_audio_ms is None:
                    turn.first_audio_ms = since_end()
                    first_audio.set()
                turn.audio += msg.audio.data
                turn.audio_s += msg.audio.duration_s
                turn.chunks += 1
                turn.chunk_arrivals.append(since_end() / 1000)
                turn.chunk_durations.append(msg.audio.duration_s)
            elif kind == "text":
                if turn.first_text_ms is None:
                    turn.first_text_ms = since_end()
                turn.text += msg.text.text
            elif kind == "turn_finished":
                t = msg.turn_finished.timings
                turn.server_timings = {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields}
                turn.mode = msg.turn_finished.mode
                turn.text_tokens, turn.audio_tokens = msg.turn_finished.text_tokens, msg.turn_finished.audio_tokens
                turn_done.set()
            elif kind == "interrupted":
                turn.interrupted = True
            elif kind == "error":
                turn.error = f"{msg.error.code}: {msg.error.message}"
                turn_done.set()

    async with secure_or_insecure_channel(target, tls, caller_options()) as channel:
        call = conversation_pb2_grpc.ConversationStub(channel).Converse(requests(), metadata=metadata or None)
        speaker = asyncio.create_task(speak())
        receiver = asyncio.create_task(receive(call))
        await asyncio.wait({speaker, receiver}, return_when=asyncio.FIRST_EXCEPTION)
        if speaker.done() and not speaker.cancelled() and isinstance(speaker.exception(), asyncio.TimeoutError):
            result.status, result.details = "DEADLINE_EXCEEDED", f"no answer within {turn_timeout_s:.0f} s"
            call.cancel()
        try:
            await receiver
        except grpc.aio.AioRpcError as exc:
            result.status, result.details = exc.code().name, exc.details() or ""
        except asyncio.CancelledError:
            pass
        finally:
            speaker.cancel()
            await asyncio.gather(speaker, return_exceptions=True)
    return result
