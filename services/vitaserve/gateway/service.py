"""The public Conversation service: a thin gRPC edge over gateway.call and gateway.pipeline, and `serve`.

Every RPC first passes `_call_slot`: not draining, an authenticated caller allowed this RPC
(gateway/auth.py: UNAUTHENTICATED / PERMISSION_DENIED), a place on this replica (--max-calls), and
a slot in its tenant's quota shared by all replicas (gateway/quota.py: RESOURCE_EXHAUSTED with
google.rpc.RetryInfo). Health and reflection are other services of the server and need no credentials.

`serve(settings)` is a pod's whole life: build the clients (gateway.deps), serve until SIGTERM, drain,
close every client. `Gateway.start` is the same path without the signal handling, for tests that run
gateways in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import aclosing

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from vitaserve.api import conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.common import metrics
from vitaserve.common.grpc_server import ServiceRunner, make_server, start_metrics
from vitaserve.common.session_store import StoreUnavailable
from vitaserve.gateway.adapters.readiness import health_name
from vitaserve.gateway.answer import AnswerProgress, AnswerSinks
from vitaserve.gateway.auth import AuthError, Caller
from vitaserve.gateway.call import Call
from vitaserve.gateway.codecs import PCM16, AudioFormatError, OutputFormat, decode_audio
from vitaserve.gateway.convert import (CallError, call_status, generation_options, output_format, turn_status,
                                       wire_format)
from vitaserve.gateway.deps import GatewayDeps, build_deps
from vitaserve.gateway.outbox import Outbox
from vitaserve.gateway.pipeline import AnswerPipeline
from vitaserve.gateway.quota import QuotaExceeded
from vitaserve.gateway.settings import GatewaySettings

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Conversation"].full_name
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_TTS_CHARS = 2000
MAX_TRANSCRIBE_S = 60.0
SYNTHESIS_FORMAT = OutputFormat(PCM16, 24000)  # when the request names none
TRANSCRIBE_MAX_NEW_TOKENS = 512


async def _no_text(_: str) -> None:
    return None


class Refused(Exception):
    """A call refused before it starts: its status, and how long to wait before retrying (RetryInfo)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.retry_after_s = code, retry_after_s


def edge_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a protocol edge (a telephony adapter) answers for a call that ended with
    `exc`: the gate's refusal (credentials, the replica, the tenant's quota, drain) with when to retry,
    or the call's own failure (convert.call_status)."""
    if isinstance(exc, Refused):
        retry = exc.retry_after_s
        return exc.code, str(exc) + (f" (retry in {retry:.0f} s)" if retry else "")
    return call_status(exc)


def retry_status(code: grpc.StatusCode, message: str, retry_after_s: float) -> grpc.Status:
    """A status whose details carry google.rpc.RetryInfo (grpc-status-details-bin), as Google's APIs
    answer a quota: clients with the standard error model read when to retry from it."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(retry_after_s, 0.0) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


class ConversationServicer(conversation_pb2_grpc.ConversationServicer):
    def __init__(self, deps: GatewayDeps):
        self.deps = deps
        self.pipeline = AnswerPipeline(deps)
        self.draining = False
        self.active = 0  # Converse calls (drain waits for them)
        self.calls = 0   # calls of every RPC, against settings.max_calls
        metrics.GATEWAY_MAX_CALLS.set(deps.settings.max_calls)
        self.idle = asyncio.Event()
        self.idle.set()

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str):
        metrics.GATEWAY_ERRORS.labels(code.name).inc()
        await context.abort(code, message)

    def _options(self, mode: str, sampling, max_new_tokens: int):
        return generation_options(mode, sampling, max_new_tokens, settings=self.deps.settings,
                                  num_mtp_modules=self.deps.num_mtp_modules)

    # ---- admission: at most settings.max_calls calls of every RPC together ------------------------
    def _admit(self, rpc: str) -> bool:
        """Take a place for one call, or count a refusal. Synchronous (no await between the check and
        the count), so concurrent calls on the loop never overshoot the limit."""
        if self.calls >= self.deps.settings.max_calls:
            metrics.GATEWAY_REFUSED.labels(rpc).inc()
            return False
        self.calls += 1
        metrics.GATEWAY_CALLS.inc()
        return True

    def _release(self) -> None:
        self.calls -= 1
        metrics.GATEWAY_CALLS.dec()

    def _call_slot(self, context, rpc: str):
        return self.call_slot(context.invocation_metadata(), rpc)

    @contextlib.asynccontextmanager
    async def call_slot(self, metadata, rpc: str):
        """The caller of one call (credentials from gRPC metadata, or an adapter's (name, value)
        pairs), holding its place on this replica and in its tenant's quota for the block; Refused
        (before anything runs) when any of them says no. Converse and the protocol adapters
        (gateway/adapters/) pass the same gate."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          "this gateway replica is shutting down: reconnect (resume with your session_id)")
        try:
            caller = self.deps.auth.authenticate(metadata, rpc)
        except AuthError as exc:
            raise Refused(exc.code, str(exc)) from None
        if not self._admit(rpc):
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this gateway replica is at its limit of {self.deps.settings.max_calls} calls: "
                          "retry on another replica")
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(self.deps.quotas.call(caller.tenant))
                except QuotaExceeded as exc:
                    log.info("call over its tenant's quota", tenant=caller.tenant, rpc=rpc)
                    metrics.GATEWAY_QUOTA_REFUSED.labels(rpc).inc()
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc.retry_after_s) from None
                except StoreUnavailable as exc:
                    raise Refused(grpc.StatusCode.UNAVAILABLE, f"the quota store is unavailable: {exc}") from None
                yield caller
        finally:
            self._release()

    async def _refuse(self, context, refused: Refused) -> None:
        if refused.retry_after_s is None:
            await self._abort(context, refused.code, str(refused))
        metrics.GATEWAY_ERRORS.labels(refused.code.name).inc()
        status = retry_status(refused.code, str(refused), refused.retry_after_s)
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def _write(self, context, message) -> None:
        """Send one message; a caller that takes none for max_reader_stall_s ends its call. Until
        then a slow reader holds the answer back: gRPC's flow control stops this write, the call's
        Outbox fills (64 messages) and the answer waits, so nothing piles up in memory."""
        stall_s = self.deps.settings.max_reader_stall_s
        try:
            await asyncio.wait_for(context.write(message), stall_s)
        except asyncio.TimeoutError:
            metrics.GATEWAY_CALL_LIMITS.labels("reader_stall").inc()
            raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the caller read no message for {stall_s:g} s: the call ended (resume with its "
                            "session_id)") from None

    async def Converse(self, request_iterator, context):
        try:
            async with self._call_slot(context, "converse") as caller:
                await self._converse(request_iterator, context, caller)
        except Refused as refused:
            # read the caller's first message before refusing: a client still writing when the
            # server ends the stream sees INTERNAL from its own gRPC core, not our status (grpc#36066)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(request_iterator), None), 1.0)
            await self._refuse(context, refused)

    @contextlib.contextmanager
    def live_call(self):
        """One running call (Converse or an adapter's): drain waits until none is left."""
        self.active += 1
        self.idle.clear()
        metrics.GATEWAY_ACTIVE_STREAMS.inc()
        try:
            yield
        finally:
            self.active -= 1
            metrics.GATEWAY_ACTIVE_STREAMS.dec()
            if self.active == 0:
                self.idle.set()

    async def _converse(self, request_iterator, context, caller: Caller) -> None:
        with self.live_call():
            try:
                async with aclosing(Call(self.deps, caller.tenant).run(request_iterator)) as messages:
                    async for message in messages:
                        await self._write(context, message)
            except grpc.aio.InternalError as exc:
                # the core refused a write or read: the caller cancelled as we wrote (done() still False
                # then). Nobody is left to tell, and it is not a failure of ours to count as INTERNAL.
                log.info("caller gone mid-call", error=repr(exc))
            except Exception as exc:
                code, message = call_status(exc)
                await self._abort(context, code, message)

    async def Synthesize(self, request, context):
        try:
            async with self._call_slot(context, "synthesize"):
                await self._synthesize(request, context)
        except Refused as refused:
            await self._refuse(context, refused)

    async def _synthesize(self, request, context):
        text = request.text.strip()
        if not text or len(text) > MAX_TTS_CHARS:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"text must have 1..{MAX_TTS_CHARS} characters, got {len(text)}")
        try:
            fmt = (output_format(request.output_format, "output_format") if request.output_format.codec
                   else SYNTHESIS_FORMAT)
            opts = self._options(request.mode, request.sampling, request.max_new_tokens)
            prompt = await self.pipeline.tts_prompt(text, opts.max_new_tokens)
        except CallError as exc:
            await self._abort(context, exc.code, str(exc))
        pb_fmt = wire_format(fmt)
        outbox: Outbox[pb.SynthesizeResponse] = Outbox()

        async def audio(payload: bytes, seq: int, duration: float) -> None:
            await outbox.put(pb.SynthesizeResponse(audio=pb.AudioChunk(seq=seq, data=payload, format=pb_fmt,
                                                                       duration_s=duration)))

        progress = AnswerProgress()
        start = time.perf_counter()  # the clock of AnswerProgress
        try:
            speaking = self.pipeline.speak(prompt, opts, fmt, AnswerSinks(_no_text, audio), progress)
            async with aclosing(outbox.drain(speaking)) as messages:
                async for message in messages:
                    await self._write(context, message)
            first_ms = 0.0 if progress.first_audio_at is None else (progress.first_audio_at - start) * 1000
            await self._write(context, pb.SynthesizeResponse(finished=pb.SynthesisFinished(
                audio_tokens=progress.audio_tokens, audio_s=progress.audio_sent_s,
                first_audio_ms=max(first_ms, 0.0))))
        except CallError as exc:  # the caller stopped reading
            await self._abort(context, exc.code, str(exc))
        except Exception as exc:
            code, message = turn_status(exc)
            await self._abort(context, code, f"synthesis failed: {message}")

    async def Transcribe(self, request, context):
        try:
            async with self._call_slot(context, "transcribe"):
                return await self._transcribe(request, context)
        except Refused as refused:
            await self._refuse(context, refused)

    async def _transcribe(self, request, context):
        try:
            fmt = output_format(request.format, "format")
            samples = decode_audio(request.audio, fmt.codec, fmt.sample_rate)
        except CallError as exc:
            await self._abort(context, exc.code, str(exc))
        except AudioFormatError as exc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"audio: {exc}")
        if samples.size < fmt.sample_rate // 10 or samples.size > MAX_TRANSCRIBE_S * fmt.sample_rate:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"audio must last 0.1..{MAX_TRANSCRIBE_S:.0f} s, got {samples.size / fmt.sample_rate:.2f} s")
        try:
            # text only: vanilla needs no MCTP step
            opts = self._options("vanilla", request.sampling, TRANSCRIBE_MAX_NEW_TOKENS)
            tokens = await self.pipeline.encode(samples, fmt.sample_rate)
            text = await self.pipeline.text(await self.pipeline.asr_prompt(tokens), opts)
        except Exception as exc:
            code, message = turn_status(exc)
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


def _twilio(servicer):
    from vitaserve.gateway.adapters.twilio_server import TwilioServer  # the adapters import this module

    return TwilioServer(servicer)


def _realtime(servicer):
    from vitaserve.gateway.adapters.realtime_server import RealtimeServer

    return RealtimeServer(servicer)


def _audiosocket(servicer):
    from vitaserve.gateway.adapters.audiosocket_server import AudioSocketServer

    return AudioSocketServer(servicer)


ADAPTERS = {"twilio": _twilio, "realtime": _realtime, "audiosocket": _audiosocket}  # protocol -> its server


def adapters_of(settings: GatewaySettings) -> dict[str, int]:
    """The telephony adapters this replica serves (--<protocol>-port set), with their ports."""
    return {name: getattr(settings, f"{name}_port") for name in ADAPTERS if getattr(settings, f"{name}_port")}


class Gateway:
    """A started gateway replica: its clients, its servicer and its gRPC server."""

    def __init__(self, settings: GatewaySettings, deps: GatewayDeps, servicer: ConversationServicer,
                 runner: ServiceRunner):
        self.settings, self.deps, self.servicer, self.runner = settings, deps, servicer, runner
        self.twilio = None  # gateway.adapters.twilio_server.TwilioServer, with --twilio-port
        self.realtime = None  # gateway.adapters.realtime_server.RealtimeServer, with --realtime-port
        self.audiosocket = None  # gateway.adapters.audiosocket_server.AudioSocketServer, with --audiosocket-port
        self._closed = False

    @property
    def port(self) -> int:
        return self.runner.port

    @classmethod
    async def start(cls, settings: GatewaySettings) -> "Gateway":
        """Clients, then the telephony adapters' listeners, then the gRPC server: its health says
        SERVING only once every adapter asked for listens (gateway/adapters/readiness.py)."""
        deps = await build_deps(settings)
        gateway = None
        try:
            servicer = ConversationServicer(deps)
            server = make_server(max_message_bytes=MAX_MESSAGE_BYTES)
            conversation_pb2_grpc.add_ConversationServicer_to_server(servicer, server)
            adapters = adapters_of(settings)
            runner = ServiceRunner(server, [SERVICE_NAME], settings.port, host=settings.host, tls=settings.tls,
                                   health_port=settings.health_port, health_names=[health_name(a) for a in adapters])
            gateway = cls(settings, deps, servicer, runner)
            for name, port in adapters.items():
                adapter = ADAPTERS[name](servicer)  # listening from here on; the gate refuses nothing yet
                setattr(gateway, name, adapter)
                await adapter.start(port)
            start_metrics(settings.metrics_port)
            await runner.start()
        except BaseException:
            if gateway is not None:
                await gateway.stop(0)
            else:
                await deps.aclose()
            raise
        log.info("gateway serving", port=runner.port, encoder=settings.encoder, decoder=settings.decoder,
                 triton=settings.triton, replica_id=settings.replica_id, adapters=sorted(adapters))
        return gateway

    async def serve_until_signal(self) -> None:
        """Until SIGTERM/SIGINT: then health NOT_SERVING, no new calls, running ones get grace_s."""
        grace_s = self.settings.grace_s
        await self.runner.serve_until_signal(grace_s, on_drain=lambda: self.servicer.drain(grace_s))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop the server (running calls get grace_s), then close every client; once."""
        if self._closed:
            return
        self._closed = True
        try:
            for name in ADAPTERS:
                if getattr(self, name) is not None:
                    await getattr(self, name).stop()
            await self.runner.stop(grace_s)
        finally:
            await self.deps.aclose()


async def serve(settings: GatewaySettings, ready=None) -> None:
    """Run one gateway replica until SIGTERM; `ready(runner)` is called once it takes calls."""
    gateway = await Gateway.start(settings)
    try:
        if ready is not None:
            ready(gateway.runner)
        await gateway.serve_until_signal()
    finally:
        await gateway.stop(0)  # the server has drained already, unless serving failed
