"""The public Conversation service: a thin gRPC edge over gateway.call and gateway.answer."""

from __future__ import annotations

import asyncio
import socket

import grpc
import structlog

from vitaserve.api import audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.common import metrics
from vitaserve.common.session_store import StoreUnavailable
from vitaserve.gateway.answer import AnswerProgress, AnswerSinks, speak
from vitaserve.gateway.call import CODEC_ENUM, Call, CallError, audio_format, generation_options, turn_error
from vitaserve.gateway.chunker import ChunkPlan
from vitaserve.gateway.codecs import AudioFormatError, decode_audio
from vitaserve.gateway.config import GatewayConfig, GatewayDeps

log = structlog.get_logger(__name__)

_DONE = object()
MAX_TTS_CHARS = 2000
MAX_TRANSCRIBE_S = 60.0


class ConversationServicer(conversation_pb2_grpc.ConversationServicer):
    def __init__(self, deps: GatewayDeps):
        self.deps = deps
        self.draining = False
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def _abort(self, context, code: grpc.StatusCode, message: str):
        metrics.GATEWAY_ERRORS.labels(code.name).inc()
        await context.abort(code, message)

    async def Converse(self, request_iterator, context):
        if self.draining:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE,
                              "this gateway replica is shutting down: reconnect (resume with your session_id)")
        out: asyncio.Queue = asyncio.Queue()
        call = Call(self.deps, out)
        task = asyncio.create_task(call.run(aiter(request_iterator)))
        task.add_done_callback(lambda _: out.put_nowait(_DONE))
        self.active += 1
        self.idle.clear()
        metrics.GATEWAY_ACTIVE_STREAMS.inc()
        try:
            while (item := await out.get()) is not _DONE:
                yield item
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, CallError):
                await self._abort(context, exc.code, str(exc))
            elif isinstance(exc, StoreUnavailable):
                await self._abort(context, grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}")
            elif exc is not None:
                log.error("call failed", error=repr(exc), session_id=call.session_id)
                await self._abort(context, grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self.active -= 1
            metrics.GATEWAY_ACTIVE_STREAMS.dec()
            if self.active == 0:
                self.idle.set()

    async def Synthesize(self, request, context):
        text = request.text.strip()
        if not text or len(text) > MAX_TTS_CHARS:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"text must have 1..{MAX_TTS_CHARS} characters, got {len(text)}")
        try:
            fmt = (audio_format(request.output_format, "output_format") if request.output_format.codec
                   else audio_format(audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16, sample_rate=24000),
                                     "output_format"))
            opts = generation_options(self.deps, request.mode, request.sampling, request.max_new_tokens)
            prompt = await asyncio.to_thread(self.deps.prompts.tts, text)
            if len(prompt) + opts.max_new_tokens > self.deps.config.context_tokens:
                raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the text ({len(prompt)} tokens) and max_new_tokens ({opts.max_new_tokens}) exceed "
                                f"the context of {self.deps.config.context_tokens} tokens: shorten one of them")
        except CallError as exc:
            await self._abort(context, exc.code, str(exc))
        pb_fmt = audio_pb2.AudioFormat(codec=CODEC_ENUM[fmt.codec], sample_rate=fmt.sample_rate)
        out: asyncio.Queue = asyncio.Queue()

        async def audio(payload: bytes, seq: int, duration: float) -> None:
            await out.put(pb.SynthesizeResponse(audio=pb.AudioChunk(seq=seq, data=payload, format=pb_fmt,
                                                                    duration_s=duration)))

        async def no_text(_: str) -> None:
            return None

        progress = AnswerProgress()
        start = asyncio.get_running_loop().time()
        task = asyncio.create_task(speak(self.deps, prompt, opts, fmt, AnswerSinks(no_text, audio), progress,
                                         ChunkPlan.parse(self.deps.config.chunk_plan)))
        task.add_done_callback(lambda _: out.put_nowait(_DONE))
        try:
            while (item := await out.get()) is not _DONE:
                yield item
            if not task.cancelled() and task.exception() is not None:
                code, message = turn_error(task.exception())
                await self._abort(context, code, f"synthesis failed: {message}")
            first_ms = 0.0 if progress.first_audio_at is None else (progress.first_audio_at - start) * 1000
            yield pb.SynthesizeResponse(finished=pb.SynthesisFinished(
                audio_tokens=progress.audio_tokens, audio_s=progress.audio_sent_s, first_audio_ms=max(first_ms, 0.0)))
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def Transcribe(self, request, context):
        try:
            fmt = audio_format(request.format, "format")
            samples = decode_audio(request.audio, fmt.codec, fmt.sample_rate)
        except CallError as exc:
            await self._abort(context, exc.code, str(exc))
        except AudioFormatError as exc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"audio: {exc}")
        if samples.size < fmt.sample_rate // 10 or samples.size > MAX_TRANSCRIBE_S * fmt.sample_rate:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"audio must last 0.1..{MAX_TRANSCRIBE_S:.0f} s, got {samples.size / fmt.sample_rate:.2f} s")
        from vitaserve.common.resample import resample
        from vitaserve.lmtext.detokenize import TextStream

        try:
            x = await asyncio.to_thread(resample, samples, fmt.sample_rate, 16000)
            tokens = await self.deps.encoder.encode(x)
            prompt = await asyncio.to_thread(self.deps.prompts.asr, tokens)
            opts = generation_options(self.deps, "vanilla", request.sampling, 512)  # text only: no MCTP needed
            stream = TextStream(self.deps.text_tokenizer, self.deps.vocab.endoftext_id)
            text = ""
            async for token in self.deps.generator.generate(prompt, opts):
                text += stream.push(token.token_id)
            text += stream.flush()
        except Exception as exc:
            code, message = turn_error(exc)
            await self._abort(context, code, f"transcription failed: {message}")
        return pb.TranscribeResponse(text=text, audio_tokens_in=len(tokens))

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls, then give the running ones up to grace_s to end."""
        self.draining = True
        metrics.GATEWAY_DRAINING.set(1)
        try:
            await asyncio.wait_for(self.idle.wait(), grace_s)
        except asyncio.TimeoutError:
            log.warning("drain timed out", active_calls=self.active)


def build_deps(lm_dir: str, encoder: str, decoder: str, triton: str, redis_url: str,
               config: GatewayConfig) -> GatewayDeps:
    from vitaserve.common.session_store import SessionStore, connect_redis
    from vitaserve.gateway.backends import DecoderClient, EncoderClient
    from vitaserve.gateway.generator_client import GeneratorClient
    from vitaserve.lmtext.prompt import PromptBuilder
    from vitaserve.lmtext.text_tokenizer import load_text_tokenizer
    from vitaserve.lmtext.vocab import AudioVocab

    from vitaserve.lmtext.config import LMConfig

    tokenizer = load_text_tokenizer(lm_dir)
    store = SessionStore(connect_redis(redis_url),
                         on_retry=lambda what, attempt, exc: metrics.STORE_RETRIES.labels(what).inc())
    return GatewayDeps(config=config, encoder=EncoderClient(encoder), decoder=DecoderClient(decoder),
                       generator=GeneratorClient(triton), store=store, text_tokenizer=tokenizer,
                       vocab=AudioVocab.from_tokenizer(tokenizer), prompts=PromptBuilder(tokenizer),
                       num_mtp_modules=LMConfig.from_folder(lm_dir).num_nextn_predict_layers)


async def serve(lm_dir: str, port: int, encoder: str, decoder: str, triton: str, redis_url: str,
                metrics_port: int = 0, mode: str = "boost", grace_s: float = 30.0, ready=None,
                config: GatewayConfig | None = None) -> None:
    from vitaserve.common.grpc_server import ServiceRunner, make_server, start_metrics

    config = config or GatewayConfig(default_mode=mode, replica_id=socket.gethostname())
    deps = build_deps(lm_dir, encoder, decoder, triton, redis_url, config)
    servicer = ConversationServicer(deps)
    server = make_server(max_message_bytes=1024 * 1024)
    conversation_pb2_grpc.add_ConversationServicer_to_server(servicer, server)
    runner = ServiceRunner(server, [pb.DESCRIPTOR.services_by_name["Conversation"].full_name], port)
    start_metrics(metrics_port)
    await runner.start()
    log.info("gateway serving", port=runner.port, encoder=encoder, decoder=decoder, triton=triton)
    if ready is not None:
        ready(runner)
    await runner.serve_until_signal(grace_s, on_drain=lambda: servicer.drain(grace_s))
