"""One phone call on the Converse stream: caller audio in, turns answered, barge-in, history.

`Call.run` is an async generator of the call's messages, which the servicer passes on. It reads the
caller in one task; each turn's answer (encode -> prompt -> speak, gateway.pipeline) is a task of
its TaskGroup, at most one at a time, so barge-in is one cancel and a half-close lets the running
answer finish. Answer messages reach `run` through a bounded Outbox: a slow reader holds the answer
back. Protocol errors raise CallError (the servicer turns it into the gRPC status); a failed turn is
reported with an Error message and the call goes on.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import grpc
import numpy as np
import structlog

from vitaserve.api import conversation_pb2 as pb
from vitaserve.common import keys, metrics, tracing
from vitaserve.common.audio_facts import TOKENIZER_RATE
from vitaserve.common.resample import StreamResampler
from vitaserve.common.session_store import (SessionConfig, SessionEnded, SessionError, SessionNotFound,
                                            StaleWriteError, StoreUnavailable, TurnRecord)
from vitaserve.gateway.answer import AnswerProgress, AnswerSinks, first_leaf
from vitaserve.gateway.codecs import AudioFormatError, OutputFormat, decode_audio
from vitaserve.gateway.convert import CallError, generation_options, output_format, turn_status, wire_format
from vitaserve.gateway.deps import GatewayDeps
from vitaserve.gateway.outbox import Outbox
from vitaserve.gateway.pipeline import AnswerPipeline
from vitaserve.gateway.playback import PLAYED_SLACK_S, FinishedAnswer, heard_ids, report_error, tokens_heard
from vitaserve.gateway.vad import SpeechEnded, SpeechStarted, VadConfig, VoiceActivityDetector
from vitaserve.lmtext.prompt import LUKE_SYSTEM, Turn

log = structlog.get_logger(__name__)

MIN_UTTERANCE_TOKENS = 13  # 1 s of speech at 12.5 tokens/s
# A system prompt over this many characters per context token is refused unread: text averages ~4
# characters per BPE token, so it would not fit anyway, and tokenizing it (on the event loop) first
# stalled every call of the replica (a 900 kB prompt: seconds).
SYSTEM_PROMPT_CHARS_PER_TOKEN = 4


def answer_sinks(outbox: Outbox[pb.ConverseResponse], turn: int, fmt: OutputFormat) -> AnswerSinks:
    pb_fmt = wire_format(fmt)

    async def text(delta: str) -> None:
        await outbox.put(pb.ConverseResponse(text=pb.TextDelta(turn=turn, text=delta)))

    async def audio(payload: bytes, seq: int, duration: float) -> None:
        await outbox.put(pb.ConverseResponse(audio=pb.AudioChunk(turn=turn, seq=seq, data=payload, format=pb_fmt,
                                                                 duration_s=duration)))

    return AnswerSinks(text, audio)


class Call:
    def __init__(self, deps: GatewayDeps, tenant: str = keys.ANONYMOUS_TENANT):
        self.deps, self.settings = deps, deps.settings
        self.tenant = tenant  # the authenticated caller's: it may resume only its own tenant's sessions
        self.pipeline = AnswerPipeline(deps)
        self.outbox: Outbox[pb.ConverseResponse] = Outbox()
        self.owner = f"{self.settings.replica_id}:{uuid.uuid4().hex[:8]}"
        self.answers: asyncio.TaskGroup | None = None
        self.answer_task: asyncio.Task | None = None
        self.answering: tuple[int, AnswerProgress] | None = None  # the begun turn being answered now
        self.finished: FinishedAnswer | None = None  # the last answer stored whole, maybe still playing
        self.stored: FinishedAnswer | None = None  # the last answer stored, whole or cut (cut_to_heard)
        self.session_id = ""
        self.turns_done = 0
        # the call's limits (ARCHITECTURE.md "Limits and admission"); perf_counter, AnswerProgress's clock
        self.opened_at = time.perf_counter()
        self.heard_at = self.opened_at  # the caller's last message
        self.last_answer: tuple[AnswerProgress, float] | None = None  # (progress, when it ended)

    async def run(self, requests) -> AsyncIterator[pb.ConverseResponse]:
        """The call's messages, in order, until it ends: SessionStarted, then whatever the caller's
        audio and controls and the answers produce. A CallError or a store failure ends it."""
        requests = aiter(requests)
        try:
            first = await asyncio.wait_for(anext(requests, None), self.settings.first_message_s)
        except asyncio.TimeoutError:
            metrics.GATEWAY_CALL_LIMITS.labels("first_message").inc()
            raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no message within {self.settings.first_message_s:g} s of opening the call: "
                            "send `config` (CallConfig) first") from None
        if first is None or first.WhichOneof("message") != "config":
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            "the first message of a call must be `config` (CallConfig)")
        yield await self._open(first.config)
        async with aclosing(self.outbox.drain(self._converse(requests))) as messages:
            async for message in messages:
                yield message

    # ---- set-up --------------------------------------------------------------------------
    async def _open(self, config: pb.CallConfig) -> pb.ConverseResponse:
        """Check the config, create or claim the session; the SessionStarted message."""
        self.in_fmt = output_format(config.input_format, "input_format")
        self.out_fmt = (output_format(config.output_format, "output_format")
                        if config.HasField("output_format") and config.output_format.codec else self.in_fmt)
        mode = config.mode or self.settings.default_mode
        self.opts = generation_options(mode, config.sampling, config.max_new_tokens, settings=self.settings,
                                       num_mtp_modules=self.deps.num_mtp_modules)
        max_chars = SYSTEM_PROMPT_CHARS_PER_TOKEN * self.settings.context_tokens
        if len(config.system_prompt) > max_chars:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"system_prompt has {len(config.system_prompt)} "
                            f"characters, at most {max_chars} (the context holds {self.settings.context_tokens} tokens)")
        self.system = config.system_prompt if config.HasField("system_prompt") else LUKE_SYSTEM
        explicit = config.max_new_tokens > 0
        self._fit_answer_to_context(explicit)
        self.push_to_talk = config.push_to_talk
        vad_opts = config.vad
        try:
            vad_cfg = VadConfig(max_utterance_s=self.settings.max_utterance_s).with_options(
                threshold=vad_opts.threshold if vad_opts.HasField("threshold") else None,
                min_silence_ms=vad_opts.min_silence_ms if vad_opts.HasField("min_silence_ms") else None,
                min_speech_ms=vad_opts.min_speech_ms if vad_opts.HasField("min_speech_ms") else None)
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"vad: {exc}") from None
        self.vad = (None if self.push_to_talk else  # own state, the process's one model (torch: off the loop)
                    await asyncio.to_thread(VoiceActivityDetector, vad_cfg, self.deps.vad_model))
        self.in_resampler = StreamResampler(self.in_fmt.sample_rate, TOKENIZER_RATE)
        self.ptt_buffer: list[np.ndarray] = []
        store = self.deps.store
        resumed = bool(config.session_id)
        try:
            if resumed:
                record = await store.claim(config.session_id, self.owner, self.tenant)
                self.session_id = config.session_id
                self.turns_done = record.turn
                if not config.HasField("system_prompt"):  # the call keeps the persona it started with
                    self.system = record.config.system_prompt
                    self._fit_answer_to_context(explicit)
            else:
                self.session_id = await store.create(
                    SessionConfig(mode=mode, codec=self.in_fmt.codec, sample_rate=self.in_fmt.sample_rate,
                                  system_prompt=self.system), owner=self.owner, tenant=self.tenant)
        except (SessionNotFound, SessionEnded) as exc:
            raise CallError(grpc.StatusCode.NOT_FOUND, f"session {config.session_id}: {exc}") from None
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"session_id: {exc}") from None
        structlog.contextvars.bind_contextvars(session_id=self.session_id, tenant=self.tenant)
        return pb.ConverseResponse(session_started=pb.SessionStarted(
            session_id=self.session_id, resumed=resumed, turns_so_far=self.turns_done,
            output_format=wire_format(self.out_fmt), mode=mode))

    def _fit_answer_to_context(self, explicit: bool) -> None:
        """The smallest prompt of this call (system prompt and a 1 s utterance, no history) and the
        answer must fit the context: an explicit max_new_tokens that does not is refused, the
        server default is lowered to what fits."""
        context = self.settings.context_tokens
        floor = len(self.deps.prompts.spoken_qa([0] * MIN_UTTERANCE_TOKENS, [], self.system or None))
        if self.opts.max_new_tokens + floor <= context:
            return
        if explicit or floor >= context:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"max_new_tokens {self.opts.max_new_tokens} and the smallest prompt of this call "
                            f"({floor} tokens) exceed the context of {context} tokens")
        self.opts = replace(self.opts, max_new_tokens=context - floor)

    # ---- the caller's messages ---------------------------------------------------------------
    async def _converse(self, requests) -> None:
        """Read the caller until half-close or HANG_UP. Answers are tasks of a TaskGroup: a
        half-close lets the running one finish; a failure or cancellation of the call stops it."""
        try:
            async with asyncio.TaskGroup() as self.answers:
                await self._read(requests)
        except BaseExceptionGroup as group_error:  # the call's own error, not a group
            raise first_leaf(group_error) from None

    async def _read(self, requests) -> None:
        started = time.monotonic()
        audio_s = 0.0
        async for msg in self._heard(requests):
            kind = msg.WhichOneof("message")
            if kind == "audio":
                audio_s += await self._on_audio(msg.audio.data)
                if audio_s > time.monotonic() - started + self.settings.realtime_slack_s:
                    raise CallError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"audio arrives faster than real time ({audio_s:.1f} s of audio in "
                                    f"{time.monotonic() - started:.1f} s): send 20 ms frames as they are spoken")
            elif kind == "control":
                if await self._on_control(msg.control):
                    return
            elif kind == "playback":
                await self._on_playback(msg.playback)
            else:
                raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "config may only be sent once, first")

    async def _heard(self, requests) -> AsyncIterator[pb.ConverseRequest]:
        """The caller's messages until it half-closes; ends the call (DEADLINE_EXCEEDED) at its idle
        or length limit. One read is pending at a time and is never cancelled while waiting (a
        cancelled read would break the stream), only when the call ends."""
        pending: asyncio.Future | None = None
        try:
            while True:
                self._check_limits()  # also between messages: a caller that talks on still has a longest call
                if pending is None:
                    pending = asyncio.ensure_future(anext(requests))
                done, _ = await asyncio.wait({pending}, timeout=self._until_limit())
                if not done:
                    continue
                try:
                    msg = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                self.heard_at = time.perf_counter()
                yield msg
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    def _quiet_since(self, now: float) -> float:
        """Since when neither side spoke: an answer running or still playing at the caller (it
        started playing at its first chunk and plays as long as the audio sent) keeps the call busy."""
        if self.answer_task is not None and not self.answer_task.done():
            return now
        since = self.heard_at
        if self.last_answer is not None:
            progress, ended_at = self.last_answer
            played_until = (progress.first_audio_at + progress.audio_sent_s
                            if progress.first_audio_at is not None else 0.0)
            since = max(since, ended_at, played_until)
        return since

    def _until_limit(self) -> float:
        """Seconds until the idle or the length limit could be reached (0: check now)."""
        now = time.perf_counter()
        at = min(self._quiet_since(now) + self.settings.idle_s, self.opened_at + self.settings.max_call_s)
        return max(0.0, at - now)

    def _check_limits(self) -> None:
        now = time.perf_counter()
        if now >= self.opened_at + self.settings.max_call_s:
            metrics.GATEWAY_CALL_LIMITS.labels("max_call").inc()
            raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the call reached its longest length of {self.settings.max_call_s:g} s: call "
                            f"again with session_id {self.session_id} to go on")
        if now >= self._quiet_since(now) + self.settings.idle_s:
            metrics.GATEWAY_CALL_LIMITS.labels("idle").inc()
            raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no message from the caller for {self.settings.idle_s:g} s while no answer was "
                            f"playing: the call ended (session_id {self.session_id} can be resumed)")

    async def _on_audio(self, data: bytes) -> float:
        if len(data) > self.settings.max_frame_bytes:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"audio frame of {len(data)} bytes exceeds {self.settings.max_frame_bytes}")
        try:
            samples = decode_audio(data, self.in_fmt.codec, self.in_fmt.sample_rate)
        except AudioFormatError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"audio frame: {exc}") from None
        x = self.in_resampler.process(samples)
        if self.push_to_talk:
            self.ptt_buffer.append(x)
            if sum(len(b) for b in self.ptt_buffer) > self.settings.max_utterance_s * TOKENIZER_RATE:
                raise CallError(grpc.StatusCode.OUT_OF_RANGE,
                                f"utterance longer than {self.settings.max_utterance_s:.0f} s without END_OF_UTTERANCE")
        elif x.size:
            for event in await asyncio.to_thread(self.vad.process, x):
                await self._on_vad(event)
        return len(samples) / self.in_fmt.sample_rate

    async def _on_vad(self, event) -> None:
        turn = self.turns_done + 1
        if isinstance(event, SpeechStarted):
            await self._barge_in()
            await self.outbox.put(pb.ConverseResponse(speech_started=pb.SpeechStarted(turn=turn, at_s=event.t)))
        elif isinstance(event, SpeechEnded):
            await self.outbox.put(pb.ConverseResponse(speech_ended=pb.SpeechEnded(
                turn=turn, at_s=event.t, duration_s=len(event.audio) / TOKENIZER_RATE)))
            await self._start_answer(event.audio)

    async def _on_control(self, control: pb.Control) -> bool:
        """True when the call ends."""
        action = control.action
        if control.erase_history and action != pb.Control.HANG_UP:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "erase_history goes with HANG_UP only")
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
            if audio.size < TOKENIZER_RATE // 10:
                await self.outbox.put(pb.ConverseResponse(error=pb.Error(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], turn=self.turns_done + 1,
                    message="END_OF_UTTERANCE with less than 0.1 s of audio: nothing to answer")))
                return False
            await self._start_answer(audio)
        elif action == pb.Control.CANCEL:
            await self._barge_in()
        elif action == pb.Control.HANG_UP:
            await self._barge_in()
            try:
                await self.deps.store.end(self.session_id, owner=self.owner, erase=control.erase_history)
            except (StaleWriteError, SessionNotFound, SessionEnded):
                pass
            return True
        else:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown control action {action}")
        return False

    async def _on_playback(self, report: pb.PlaybackProgress) -> None:
        """Keep the caller's latest playback report of the answer being sent, or of the last one
        finished while it may still play (the cut on barge-in). A report of an earlier turn is late
        and harmless: dropped. One that cannot be true is answered with Error{INVALID_ARGUMENT} and
        dropped; the call and the last good report stand."""
        current_turn, progress = self.answering or (0, None)
        if progress is None and self.finished is not None and report.turn == self.finished.turn:
            current_turn, progress = self.finished.turn, self.finished.progress
        if progress is None or report.turn != current_turn:
            if 1 <= report.turn <= self.turns_done:
                return
        problem = report_error(report.turn, report.seq, report.played_s, current_turn,
                               progress.chunks_sent if progress else 0, progress.audio_sent_s if progress else 0.0)
        if problem is not None:
            await self.outbox.put(pb.ConverseResponse(error=pb.Error(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=problem, turn=report.turn)))
            return
        progress.played_s, progress.played_at = report.played_s, time.perf_counter()

    async def cut_to_heard(self, turn: int, played_s: float) -> str | None:
        """Cut the last stored answer to its first `played_s` seconds of audio, after the fact: for a
        protocol whose client says what it played only once it stopped (OpenAI Realtime's
        conversation.item.truncate, sent after a barge-in or a cancel). None when cut, else why not
        (the stored turn then stays as it was)."""
        stored = self.stored
        if stored is None or stored.turn != turn or self.answering is not None:
            return f"turn {turn} is not the last answer of this call, or another answer is under way: only " \
                   "the last one can be cut, once it ended"
        progress = stored.progress
        if not math.isfinite(played_s) or not 0 <= played_s <= progress.audio_sent_s + PLAYED_SLACK_S:
            return f"{played_s:.3f} s is not within the {progress.audio_sent_s:.3f} s of audio turn {turn} sent"
        progress.played_s, progress.played_at = played_s, time.perf_counter()
        ids, text = self._heard_part(progress)
        record = TurnRecord(turn=turn, user_audio=stored.user_audio, assistant_ids=ids, text=text, interrupted=True)
        try:
            await asyncio.shield(self.deps.store.cut_turn(self.session_id, record, self.owner))
        except SessionError as exc:
            return f"turn {turn} not cut: {self._loggable(exc)}"
        if self.finished is stored:
            self.finished = None
        return None

    def _loggable(self, exc: BaseException) -> str:
        """An error for the log: the store's messages name the session, which logs show only as a hash."""
        text = repr(exc)
        return text.replace(self.session_id, tracing.session_hash(self.session_id)) if self.session_id else text

    # ---- turns ---------------------------------------------------------------------------------
    async def _barge_in(self) -> None:
        """The caller talks over the answer (speech, CANCEL, HANG_UP, its next utterance): stop the
        one being generated (stored as heard), or cut the finished one it is still playing."""
        if self.answer_task is not None and not self.answer_task.done():
            self.answer_task.cancel()
            await asyncio.gather(self.answer_task, return_exceptions=True)
        await self._cut_finished()

    async def _cut_finished(self) -> None:
        """The last answer finished generating and was stored whole, but the caller's latest report
        shows it had not played all of it: store what it heard instead (common/session_store.py
        cut_turn), and say so with Interrupted{turn}, which then follows that turn's TurnFinished.
        A cut that does not land (the store down, the call taken over) leaves the turn whole."""
        finished, self.finished = self.finished, None
        if finished is None or not finished.unheard_at(time.perf_counter()):
            return
        progress = finished.progress
        ids, text = self._heard_part(progress)
        record = TurnRecord(turn=finished.turn, user_audio=finished.user_audio, assistant_ids=ids, text=text,
                            interrupted=True)
        try:
            await asyncio.shield(self.deps.store.cut_turn(self.session_id, record, self.owner))
        except SessionError as exc:
            log.warning("finished turn not cut to what was heard", error=self._loggable(exc))
            return
        await self.outbox.put(pb.ConverseResponse(interrupted=pb.Interrupted(
            turn=finished.turn, audio_chunks_sent=progress.chunks_sent, audio_sent_s=progress.audio_sent_s)))

    async def _start_answer(self, audio: np.ndarray) -> None:
        await self._barge_in()  # one answer at a time
        self.answer_task = self.answers.create_task(self._answer(audio, time.perf_counter()))

    async def _answer(self, audio: np.ndarray, t_end: float) -> None:
        """One turn. Whatever fails reaches the caller as Error{code, turn} and leaves the session
        ready for the next turn: a turn that failed before any of it was heard gives its number
        back; one that failed mid-answer keeps what the caller heard, like a barge-in."""
        turn = self.turns_done + 1
        tracing.start_turn(self.session_id, turn)  # the turn's trace: logs and every hop carry it
        progress = AnswerProgress()
        user_tokens: list[int] = []
        outcome, begun = "failed", False
        try:
            t = time.perf_counter()
            user_tokens = await self.pipeline.encode(audio)
            encode_ms = (time.perf_counter() - t) * 1000
            metrics.GATEWAY_STAGE_MS.labels("encode").observe(encode_ms)
            history = [Turn(r.user_audio, r.assistant_ids) for r in await self.deps.store.history(self.session_id)]
            prompt = await self.pipeline.spoken_qa_prompt(user_tokens, history, self.system or None,
                                                          self.settings.context_tokens - self.opts.max_new_tokens)
            turn = await self._begin_turn()
            begun = True
            self.answering = (turn, progress)
            try:
                await self.pipeline.speak(prompt, self.opts, self.out_fmt, answer_sinks(self.outbox, turn, self.out_fmt),
                                          progress, f"{self.session_id}:{turn}")
                outcome = "completed"
            except asyncio.CancelledError:
                outcome = "interrupted"
                await self.outbox.put(pb.ConverseResponse(interrupted=pb.Interrupted(
                    turn=turn, audio_chunks_sent=progress.chunks_sent, audio_sent_s=progress.audio_sent_s)))
                raise
            finally:
                if outcome != "failed":
                    await asyncio.shield(self._commit(turn, user_tokens, progress, interrupted=outcome == "interrupted"))
                    self.stored = FinishedAnswer(turn, user_tokens, progress)
            self.finished = FinishedAnswer(turn, user_tokens, progress)  # stored whole; it may play on
            timings = turn_timings(progress, t_end, t, encode_ms)
            if progress.first_audio_at is not None:
                metrics.GATEWAY_FIRST_AUDIO_MS.labels(self.opts.mode).observe(timings.first_audio_ms)
            for stage, at in (("first_token", progress.first_token_at), ("first_block", progress.first_block_at)):
                if at is not None:
                    metrics.GATEWAY_STAGE_MS.labels(stage).observe((at - t_end) * 1000)
            if progress.first_decode_ms is not None:
                metrics.GATEWAY_STAGE_MS.labels("first_decode").observe(progress.first_decode_ms)
            await self.outbox.put(pb.ConverseResponse(turn_finished=pb.TurnFinished(
                turn=turn, mode=self.opts.mode, text=progress.text, text_tokens=progress.text_tokens,
                audio_tokens=progress.audio_tokens, timings=timings)))
        except asyncio.CancelledError:
            outcome = "interrupted"
            raise
        except Exception as exc:
            code, message = turn_status(exc)
            metrics.GATEWAY_ERRORS.labels(code.name).inc()
            log.warning("turn failed", error=self._loggable(exc), code=code.name)
            # the caller hears of it first: settling the turn in Redis may itself wait out a retry
            # budget (Redis is what failed); the next turn waits for this task, so it sees it settled
            await self.outbox.put(pb.ConverseResponse(error=pb.Error(code=code.value[0], message=message, turn=turn)))
            if begun and outcome == "failed":
                await asyncio.shield(self._settle_failed(turn, user_tokens, progress))
        finally:
            if self.answering is not None and self.answering[1] is progress:
                self.answering = None
            self.last_answer = (progress, time.perf_counter())
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
        """Store the turn: what was sent, or, for a turn cut short that the caller reported playing,
        what it heard (gateway/playback.py)."""
        ids, text = progress.generated[: progress.delivered_upto], progress.text
        if interrupted and progress.played_s is not None:
            ids, text = self._heard_part(progress)
        await self.deps.store.commit_turn(self.session_id, turn, TurnRecord(
            turn=turn, user_audio=user_tokens, assistant_ids=ids, text=text, interrupted=interrupted),
            self.owner)
        self.turns_done = turn

    def _heard_part(self, progress: AnswerProgress) -> tuple[list[int], str]:
        """The ids and text of an answer as far as the caller reported playing it (played_s set)."""
        ids = heard_ids(progress.generated[: progress.delivered_upto], self.deps.vocab.is_audio,
                        tokens_heard(progress.played_s))
        text_ids = [i for i in ids if i < self.deps.vocab.endoftext_id]
        return ids, self.deps.text_tokenizer.decode(text_ids, skip_special_tokens=False) if text_ids else ""

    async def _settle_failed(self, turn: int, user_tokens: list[int], progress: AnswerProgress) -> None:
        """A begun turn failed: keep what the caller heard (as an interrupted turn), or give the
        number back when nothing was. A store failure here is left to _begin_turn's re-read."""
        try:
            if progress.delivered_upto:
                await self._commit(turn, user_tokens, progress, interrupted=True)
            else:
                self.turns_done = await self.deps.store.abort_turn(self.session_id, turn, self.owner)
        except (StoreUnavailable, StaleWriteError, SessionNotFound, SessionEnded) as exc:
            log.warning("failed turn not settled", error=self._loggable(exc))


def turn_timings(progress: AnswerProgress, t_end: float, t_encode: float, encode_ms: float) -> pb.TurnTimings:
    """All in ms from the end of the caller's utterance (VAD end or END_OF_UTTERANCE), except the
    per-stage durations encode_ms and first_decode_ms."""
    def since_end(at: float | None) -> float:
        return 0.0 if at is None else (at - t_end) * 1000

    return pb.TurnTimings(
        first_audio_ms=since_end(progress.first_audio_at), first_text_ms=since_end(progress.first_text_at),
        encode_ms=encode_ms, first_token_ms=since_end(progress.first_token_at),
        first_decode_ms=progress.first_decode_ms or 0.0, total_ms=since_end(time.perf_counter()))

