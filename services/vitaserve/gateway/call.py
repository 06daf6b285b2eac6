"""One phone call on the Converse stream: caller audio in, turns answered, barge-in, history.

Protocol handling stays here and in service.py; the answer pipeline is answer.speak. A call is one
task reading the caller's messages plus at most one answer task; barge-in is one cancel. Protocol
errors raise CallError (the servicer turns it into the gRPC status); a failed turn is reported with
an Error message and the call goes on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import grpc
import numpy as np
import structlog

from vitaserve.api import audio_pb2, conversation_pb2 as pb
from vitaserve.common import metrics
from vitaserve.common.resample import StreamResampler
from vitaserve.common.session_store import (SessionConfig, SessionEnded, SessionNotFound, StaleWriteError,
                                            StoreUnavailable, TurnRecord)
from vitaserve.gateway.answer import AnswerProgress, AnswerSinks, OutputFormat, speak
from vitaserve.gateway.chunker import ChunkPlan
from vitaserve.gateway.codecs import AudioFormatError, check_format, decode_audio
from vitaserve.gateway.config import GatewayDeps
from vitaserve.gateway.phone import CODEC_ENUM
from vitaserve.gateway.generator_client import GenerationOptions, GeneratorError
from vitaserve.gateway.vad import SpeechEnded, SpeechStarted, VadConfig, VoiceActivityDetector
from vitaserve.lmtext.prompt import LUKE_SYSTEM, PromptTooLong, Turn
from vitaserve.lmtext.sampling_params import SamplingParams
from vitaserve.lmtext.schedule import Schedule

log = structlog.get_logger(__name__)

CODEC_NAMES = {enum: name for name, enum in CODEC_ENUM.items()}
MODEL_RATE = 16000
MIN_UTTERANCE_TOKENS = 13  # 1 s of speech at 12.5 tokens/s


class CallError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def audio_format(fmt: audio_pb2.AudioFormat, what: str) -> OutputFormat:
    if fmt.codec not in CODEC_NAMES:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: unknown or unset codec ({fmt.codec})")
    try:
        codec = check_format(CODEC_NAMES[fmt.codec], fmt.sample_rate)
    except AudioFormatError as exc:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}") from None
    return OutputFormat(codec, fmt.sample_rate)


def generation_options(deps: GatewayDeps, mode: str, sampling: audio_pb2.SamplingOptions,
                       max_new_tokens: int) -> GenerationOptions:
    """Options of one answer; a bad mode or sampling value raises CallError(INVALID_ARGUMENT)."""
    mode = mode or deps.config.default_mode
    try:
        Schedule.parse(mode, deps.num_mtp_modules)
    except ValueError as exc:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"mode: {exc}") from None
    if not 0 <= max_new_tokens < deps.config.context_tokens:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"max_new_tokens must be in [0, {deps.config.context_tokens}) (0 = the server default; the "
                        f"context holds {deps.config.context_tokens} tokens of prompt and answer), got {max_new_tokens}")

    def opt(name):
        return getattr(sampling, name) if sampling.HasField(name) else None

    options = GenerationOptions(
        mode=mode, max_new_tokens=max_new_tokens or deps.config.max_new_tokens,
        greedy=opt("greedy"), temperature=opt("temperature"), top_k=opt("top_k"), top_p=opt("top_p"),
        repetition_penalty=opt("repetition_penalty"), seed=opt("seed"))
    given = {k: getattr(options, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}
    try:  # the engine's own rules, so a bad value never reaches (or hurts) the generator
        SamplingParams(do_sample=not options.greedy, **{k: v for k, v in given.items() if v is not None}).validated()
    except ValueError as exc:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {exc}") from None
    return options


def answer_sinks(out: asyncio.Queue, turn: int, fmt: OutputFormat) -> AnswerSinks:
    pb_fmt = audio_pb2.AudioFormat(codec=CODEC_ENUM[fmt.codec], sample_rate=fmt.sample_rate)

    async def text(delta: str) -> None:
        await out.put(pb.ConverseResponse(text=pb.TextDelta(turn=turn, text=delta)))

    async def audio(payload: bytes, seq: int, duration: float) -> None:
        await out.put(pb.ConverseResponse(audio=pb.AudioChunk(turn=turn, seq=seq, data=payload, format=pb_fmt,
                                                              duration_s=duration)))

    return AnswerSinks(text, audio)


class Call:
    def __init__(self, deps: GatewayDeps, out: asyncio.Queue):
        self.deps, self.out = deps, out
        self.owner = f"{deps.config.replica_id}:{uuid.uuid4().hex[:8]}"
        self.answer_task: asyncio.Task | None = None
        self.session_id = ""
        self.turns_done = 0

    # ---- set-up --------------------------------------------------------------------------
    async def _open(self, config: pb.CallConfig) -> None:
        self.in_fmt = audio_format(config.input_format, "input_format")
        self.out_fmt = (audio_format(config.output_format, "output_format")
                        if config.HasField("output_format") and config.output_format.codec else self.in_fmt)
        mode = config.mode or self.deps.config.default_mode
        self.opts = generation_options(self.deps, mode, config.sampling, config.max_new_tokens)
        self.system = config.system_prompt if config.HasField("system_prompt") else LUKE_SYSTEM
        explicit = config.max_new_tokens > 0
        self._fit_answer_to_context(explicit)
        self.push_to_talk = config.push_to_talk
        vad_opts = config.vad
        try:
            vad_cfg = VadConfig(max_utterance_s=self.deps.config.max_utterance_s).with_options(
                threshold=vad_opts.threshold if vad_opts.HasField("threshold") else None,
                min_silence_ms=vad_opts.min_silence_ms if vad_opts.HasField("min_silence_ms") else None,
                min_speech_ms=vad_opts.min_speech_ms if vad_opts.HasField("min_speech_ms") else None)
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"vad: {exc}") from None
        self.vad = None if self.push_to_talk else VoiceActivityDetector(vad_cfg)
        self.in_resampler = StreamResampler(self.in_fmt.sample_rate, MODEL_RATE)
        self.ptt_buffer: list[np.ndarray] = []
        store = self.deps.store
        resumed = bool(config.session_id)
        try:
            if resumed:
                record = await store.claim(config.session_id, self.owner)
                self.session_id = config.session_id
                self.turns_done = record.turn
                if not config.HasField("system_prompt"):  # the call keeps the persona it started with
                    self.system = record.config.system_prompt
                    self._fit_answer_to_context(explicit)
            else:
                self.session_id = await store.create(
                    SessionConfig(mode=mode, codec=self.in_fmt.codec, sample_rate=self.in_fmt.sample_rate,
                                  system_prompt=self.system), owner=self.owner)
        except (SessionNotFound, SessionEnded) as exc:
            raise CallError(grpc.StatusCode.NOT_FOUND, f"session {config.session_id}: {exc}") from None
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"session_id: {exc}") from None
        structlog.contextvars.bind_contextvars(session_id=self.session_id)
        await self.out.put(pb.ConverseResponse(session_started=pb.SessionStarted(
            session_id=self.session_id, resumed=resumed, turns_so_far=self.turns_done,
            output_format=audio_pb2.AudioFormat(codec=CODEC_ENUM[self.out_fmt.codec],
                                                sample_rate=self.out_fmt.sample_rate), mode=mode)))

    def _fit_answer_to_context(self, explicit: bool) -> None:
        """The smallest prompt of this call (system prompt and a 1 s utterance, no history) and the
        answer must fit the context: an explicit max_new_tokens that does not is refused, the
        server default is lowered to what fits."""
        context = self.deps.config.context_tokens
        floor = len(self.deps.prompts.spoken_qa([0] * MIN_UTTERANCE_TOKENS, [], self.system or None))
        if self.opts.max_new_tokens + floor <= context:
            return
        if explicit or floor >= context:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"max_new_tokens {self.opts.max_new_tokens} and the smallest prompt of this call "
                            f"({floor} tokens) exceed the context of {context} tokens")
        self.opts = replace(self.opts, max_new_tokens=context - floor)

    # ---- the caller's messages ---------------------------------------------------------------
    async def run(self, requests) -> None:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "config":
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            "the first message of a call must be `config` (CallConfig)")
        await self._open(first.config)
        started = time.monotonic()
        audio_s = 0.0
        try:
            async for msg in requests:
                kind = msg.WhichOneof("message")
                if kind == "audio":
                    audio_s += await self._on_audio(msg.audio.data)
                    if audio_s > time.monotonic() - started + self.deps.config.realtime_slack_s:
                        raise CallError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"audio arrives faster than real time ({audio_s:.1f} s of audio in "
                                        f"{time.monotonic() - started:.1f} s): send 20 ms frames as they are spoken")
                elif kind == "control":
                    if await self._on_control(msg.control.action):
                        break
                else:
                    raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "config may only be sent once, first")
        except BaseException:
            await self._barge_in()  # the call failed or was cancelled: stop its answer too
            raise
        # the caller stopped sending (half-close) or hung up: let a running answer finish
        if self.answer_task is not None:
            await asyncio.gather(self.answer_task, return_exceptions=True)

    async def _on_audio(self, data: bytes) -> float:
        if len(data) > self.deps.config.max_frame_bytes:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"audio frame of {len(data)} bytes exceeds {self.deps.config.max_frame_bytes}")
        try:
            samples = decode_audio(data, self.in_fmt.codec, self.in_fmt.sample_rate)
        except AudioFormatError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"audio frame: {exc}") from None
        x = self.in_resampler.process(samples)
        if self.push_to_talk:
            self.ptt_buffer.append(x)
            if sum(len(b) for b in self.ptt_buffer) > self.deps.config.max_utterance_s * MODEL_RATE:
                raise CallError(grpc.StatusCode.OUT_OF_RANGE,
                                f"utterance longer than {self.deps.config.max_utterance_s:.0f} s without END_OF_UTTERANCE")
        elif x.size:
            for event in await asyncio.to_thread(self.vad.process, x):
                await self._on_vad(event)
        return len(samples) / self.in_fmt.sample_rate

    async def _on_vad(self, event) -> None:
        turn = self.turns_done + 1
        if isinstance(event, SpeechStarted):
            await self._barge_in()
            await self.out.put(pb.ConverseResponse(speech_started=pb.SpeechStarted(turn=turn, at_s=event.t)))
        elif isinstance(event, SpeechEnded):
            await self.out.put(pb.ConverseResponse(speech_ended=pb.SpeechEnded(
                turn=turn, at_s=event.t, duration_s=len(event.audio) / MODEL_RATE)))
            await self._start_answer(event.audio)

    async def _on_control(self, action) -> bool:
        """True when the call ends."""
        if action == pb.Control.END_OF_UTTERANCE:
            audio = np.concatenate(self.ptt_buffer) if self.ptt_buffer else np.zeros(0, np.float32)
            tail = self.in_resampler.flush()
            self.ptt_buffer = []
            if self.vad is not None:  # VAD calls may also mark the end explicitly
                events = await asyncio.to_thread(self.vad.flush)
                ended = [e for e in events if isinstance(e, SpeechEnded)]
                audio = ended[-1].audio if ended else audio
            else:
                audio = np.concatenate([audio, tail])
            if audio.size < MODEL_RATE // 10:
                await self.out.put(pb.ConverseResponse(error=pb.Error(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], turn=self.turns_done + 1,
                    message="END_OF_UTTERANCE with less than 0.1 s of audio: nothing to answer")))
                return False
            await self._start_answer(audio)
        elif action == pb.Control.CANCEL:
            await self._barge_in()
        elif action == pb.Control.HANG_UP:
            await self._barge_in()
            try:
                await self.deps.store.end(self.session_id, owner=self.owner)
            except (StaleWriteError, SessionNotFound, SessionEnded):
                pass
            return True
        else:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown control action {action}")
        return False

    # ---- turns ---------------------------------------------------------------------------------
    async def _barge_in(self) -> None:
        if self.answer_task is not None and not self.answer_task.done():
            self.answer_task.cancel()
            await asyncio.gather(self.answer_task, return_exceptions=True)

    async def _start_answer(self, audio: np.ndarray) -> None:
        await self._barge_in()  # one answer at a time
        self.answer_task = asyncio.create_task(self._answer(audio, time.perf_counter()))

    async def _answer(self, audio: np.ndarray, t_end: float) -> None:
        """One turn. Whatever fails reaches the caller as Error{code, turn} and leaves the session
        ready for the next turn: a turn that failed before any of it was heard gives its number
        back; one that failed mid-answer keeps what the caller heard, like a barge-in."""
        deps, turn = self.deps, self.turns_done + 1
        structlog.contextvars.bind_contextvars(turn=turn)
        progress = AnswerProgress()
        user_tokens: list[int] = []
        outcome, begun = "failed", False
        try:
            t = time.perf_counter()
            user_tokens = await deps.encoder.encode(audio)
            encode_ms = (time.perf_counter() - t) * 1000
            metrics.GATEWAY_STAGE_MS.labels("encode").observe(encode_ms)
            history = [Turn(r.user_audio, r.assistant_ids) for r in await deps.store.history(self.session_id)]
            prompt = await asyncio.to_thread(deps.prompts.spoken_qa, user_tokens, history, self.system or None,
                                             deps.config.context_tokens - self.opts.max_new_tokens)
            turn = await self._begin_turn()
            begun = True
            try:
                await speak(deps, prompt, self.opts, self.out_fmt, answer_sinks(self.out, turn, self.out_fmt),
                            progress, ChunkPlan.parse(deps.config.chunk_plan), f"{self.session_id}:{turn}")
                outcome = "completed"
            except asyncio.CancelledError:
                outcome = "interrupted"
                await self.out.put(pb.ConverseResponse(interrupted=pb.Interrupted(
                    turn=turn, audio_chunks_sent=progress.chunks_sent, audio_sent_s=progress.audio_sent_s)))
                raise
            finally:
                if outcome != "failed":
                    await asyncio.shield(self._commit(turn, user_tokens, progress, interrupted=outcome == "interrupted"))
            timings = turn_timings(progress, t_end, t, encode_ms)
            if progress.first_audio_at is not None:
                metrics.GATEWAY_FIRST_AUDIO_MS.labels(self.opts.mode).observe(timings.first_audio_ms)
            for stage, at in (("first_token", progress.first_token_at), ("first_block", progress.first_block_at)):
                if at is not None:
                    metrics.GATEWAY_STAGE_MS.labels(stage).observe((at - t_end) * 1000)
            if progress.first_decode_ms is not None:
                metrics.GATEWAY_STAGE_MS.labels("first_decode").observe(progress.first_decode_ms)
            await self.out.put(pb.ConverseResponse(turn_finished=pb.TurnFinished(
                turn=turn, mode=self.opts.mode, text=progress.text, text_tokens=progress.text_tokens,
                audio_tokens=progress.audio_tokens, timings=timings)))
        except asyncio.CancelledError:
            outcome = "interrupted"
            raise
        except Exception as exc:
            code, message = turn_error(exc)
            metrics.GATEWAY_ERRORS.labels(code.name).inc()
            log.warning("turn failed", error=repr(exc), code=code.name)
            if begun and outcome == "failed":
                await asyncio.shield(self._settle_failed(turn, user_tokens, progress))
            await self.out.put(pb.ConverseResponse(error=pb.Error(code=code.value[0], message=message, turn=turn)))
        finally:
            metrics.GATEWAY_TURNS.labels(outcome).inc()

    async def _begin_turn(self) -> int:
        """Begin the next turn. If the counter in Redis is not where this call left it (a failed turn
        whose settle-up did not land, an acknowledged write that Redis lost), and the call is still
        ours, re-read it and go on from there instead of failing every later turn."""
        store = self.deps.store
        try:
            return await store.begin_turn(self.session_id, self.turns_done, self.owner)
        except StaleWriteError as exc:
            if exc.what != "turn":
                raise
            record = await store.get(self.session_id)
            if record is None or record.owner != self.owner or record.status == "ended":
                raise
            counter = record.turn
            if record.status == "in_turn":  # our own turn left open: give its number back
                counter = await store.abort_turn(self.session_id, record.turn, self.owner)
            log.warning("turn counter re-read", was=self.turns_done, now=counter)
            self.turns_done = counter
            return await store.begin_turn(self.session_id, self.turns_done, self.owner)

    async def _commit(self, turn: int, user_tokens: list[int], progress: AnswerProgress, interrupted: bool) -> None:
        ids = progress.generated[: progress.delivered_upto]
        await self.deps.store.commit_turn(self.session_id, turn, TurnRecord(
            turn=turn, user_audio=user_tokens, assistant_ids=ids, text=progress.text, interrupted=interrupted),
            self.owner)
        self.turns_done = turn

    async def _settle_failed(self, turn: int, user_tokens: list[int], progress: AnswerProgress) -> None:
        """A begun turn failed: keep what the caller heard (as an interrupted turn), or give the
        number back when nothing was. A store failure here is left to _begin_turn's re-read."""
        try:
            if progress.delivered_upto:
                await self._commit(turn, user_tokens, progress, interrupted=True)
            else:
                self.turns_done = await self.deps.store.abort_turn(self.session_id, turn, self.owner)
        except (StoreUnavailable, StaleWriteError, SessionNotFound, SessionEnded) as exc:
            log.warning("failed turn not settled", error=repr(exc))


def turn_timings(progress: AnswerProgress, t_end: float, t_encode: float, encode_ms: float) -> pb.TurnTimings:
    """All in ms from the end of the caller's utterance (VAD end or END_OF_UTTERANCE), except the
    per-stage durations encode_ms and first_decode_ms."""
    def since_end(at: float | None) -> float:
        return 0.0 if at is None else (at - t_end) * 1000

    return pb.TurnTimings(
        first_audio_ms=since_end(progress.first_audio_at), first_text_ms=since_end(progress.first_text_at),
        encode_ms=encode_ms, first_token_ms=since_end(progress.first_token_at),
        first_decode_ms=progress.first_decode_ms or 0.0, total_ms=since_end(time.perf_counter()))


def turn_error(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message of a failed turn."""
    if isinstance(exc, CallError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, GeneratorError):
        return exc.code, f"generator: {exc}"
    if isinstance(exc, PromptTooLong):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc}: ask for fewer max_new_tokens or speak a shorter turn"
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"session store: {exc}"
    if isinstance(exc, StaleWriteError):
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, (SessionNotFound, SessionEnded)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    error_id = uuid.uuid4().hex[:12]
    log.error("turn failed with an unexpected error", error_id=error_id, error=repr(exc))
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id})"
