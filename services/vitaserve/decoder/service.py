"""The Decoder gRPC service: one audio block per call; the stream's state lives in Redis.

Block `seq` loads the state stored after block seq-1, decodes, then stores the new state, the one
it started from becoming the stream's previous state (DecoderStateStore: one hash, one atomic
seq-fenced write), so any replica can serve the next block. A retried block whose first attempt
already stored its state (the reply was lost) is recomputed from the previous state and changes
nothing in Redis. The final block is retried the same way, so the state stays until EndStream (or
its TTL) removes it.

Concurrent blocks of different streams share one flow and one HiFT forward when their shapes are
equal (`AudioDecoder.batch_key`: the same block of streams cut by the same chunk plan, such as the
first blocks of calls answering at once); each stream keeps its own noise generator, so its audio
does not depend on its batch-mates. Other blocks queue for the next forward, the block due soonest
first: a block is due at its request time plus the audio its caller still has buffered
(playback_slack_s), so first blocks, which someone is waiting for, overtake later ones.
"""

from __future__ import annotations

import grpc
import numpy as np
import structlog

from vitaserve.api import decoder_pb2, decoder_pb2_grpc
from vitaserve.common import metrics
from vitaserve.common.batcher import BatcherFull, BatcherStopped, MicroBatcher
from vitaserve.common.keys import check_stream_id
from vitaserve.common.retry_hint import NO_RETRY
from vitaserve.common.session_types import SessionError, SessionNotFound, StoreUnavailable
from vitaserve.decoder.audio_decoder import AudioDecoder, Block
from vitaserve.decoder.state_store import DecoderStateStore
from vitaserve.decoder.settings import DecoderSettings

log = structlog.get_logger(__name__)

MAX_BLOCK_TOKENS = 400
MAX_ODE_STEPS = 50
CODEBOOK = 16384
MAX_SLACK_S = 3600.0


class DecodeInputError(ValueError):
    """A request the decoder cannot serve as sent; the message says why (gRPC INVALID_ARGUMENT)."""


def validate(request: decoder_pb2.DecodeBlockRequest) -> None:
    check_stream_id(request.stream_id)  # keys.InvalidKeyPart, a ValueError
    if request.seq < 0:
        raise DecodeInputError(f"seq must be >= 0, got {request.seq}")
    if len(request.tokens) > MAX_BLOCK_TOKENS:
        raise DecodeInputError(f"a block holds at most {MAX_BLOCK_TOKENS} tokens, got {len(request.tokens)}")
    if not request.tokens and not request.finalize:
        raise DecodeInputError("an empty block is only allowed as the final one")
    bad = [t for t in request.tokens if not 0 <= t < CODEBOOK]
    if bad:
        raise DecodeInputError(f"audio token ids must be in [0, {CODEBOOK}), got {bad[:5]}")
    if not 0 <= request.ode_steps <= MAX_ODE_STEPS:
        raise DecodeInputError(f"ode_steps must be in 0..{MAX_ODE_STEPS} (0 = default), got {request.ode_steps}")
    if not 0 <= request.playback_slack_s <= MAX_SLACK_S:  # also refuses NaN
        raise DecodeInputError(
            f"playback_slack_s must be in 0..{MAX_SLACK_S:.0f} seconds, got {request.playback_slack_s}")


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    """Protocol edge: validates, loads and stores stream states; the batcher shares forwards."""

    def __init__(self, decoder, states: DecoderStateStore, max_batch: int = 8,
                 max_wait_ms: float = 2.0, default_ode_steps: int = 10, deterministic: bool = False):
        self.decoder = decoder
        self.states = states
        self.default_ode_steps = default_ode_steps
        self.deterministic = deterministic
        self.batcher = MicroBatcher(decoder.decode_chunks, max_batch, max_wait_ms, self._observe, key=self._batch_key)

    def _batch_key(self, block):
        key = self.decoder.batch_key(block)
        return key if key is not None else object()  # a key equal to nothing else: this block runs alone

    @staticmethod
    def _observe(size: int, compute_ms: float, queue_ms: list[float]) -> None:
        metrics.DECODER_BATCH_SIZE.observe(size)
        for q in queue_ms:
            metrics.DECODER_QUEUE_MS.observe(q)

    async def _load(self, stream_id: str, seq: int):
        """(state to start from, is_retry); a new stream starts from the decoder's initial state."""
        start = await self.states.start_of(stream_id, seq)
        if start.state is None:
            return self.decoder.start_stream(deterministic=self.deterministic), start.retry
        return start.state, start.retry

    async def _store(self, request, new_state) -> int:
        """The fenced write of the state after this block; returns its size (0: another attempt
        at this same block stored it while we computed, so answer as a retry)."""
        saved = await self.states.save(request.stream_id, request.seq, new_state)
        metrics.DECODER_STATE_BYTES.observe(saved.size)
        return saved.size if saved.written else 0

    async def DecodeBlock(self, request, context):
        code = "OK"
        metrics.DECODER_ACTIVE_STREAMS.inc()
        try:
            validate(request)
            state, retry = await self._load(request.stream_id, request.seq)
            steps = request.ode_steps or self.default_ode_steps
            if request.seq > 0:
                metrics.DECODER_PLAYBACK_SLACK_S.observe(request.playback_slack_s)
            block = Block(state, tuple(request.tokens), request.finalize, steps)
            (pcm, new_state), info = await self.batcher.submit_with_info(block, request.playback_slack_s)
            metrics.DECODER_BLOCK_MS.labels(str(request.seq == 0).lower()).observe(info.compute_ms)
            state_bytes = 0 if retry else await self._store(request, new_state)
            # one line per block: with the trace fields (tracing.TraceInterceptor) it ties the turn's hops together
            log.info("block decoded", seq=request.seq, tokens=len(request.tokens), final=request.finalize,
                     retry=retry, queue_ms=round(info.queue_ms, 1), compute_ms=round(info.compute_ms, 1),
                     batch=info.size)
            return decoder_pb2.DecodeBlockResponse(
                pcm_f32=np.asarray(pcm, dtype="<f4").tobytes(), sample_rate=22050, seq=request.seq,
                compute_ms=info.compute_ms, state_bytes=state_bytes, queue_ms=info.queue_ms,
                batch_size=info.size)
        except ValueError as exc:  # includes StreamStateError, SessionInputError and the decoder's own checks
            code = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SessionNotFound as exc:
            code = "NOT_FOUND"
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except StoreUnavailable as exc:
            code = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}",
                                trailing_metadata=(NO_RETRY,))
        except BatcherFull as exc:  # overload: refused at once, the gateway retries another replica
            code = "RESOURCE_EXHAUSTED"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except BatcherStopped as exc:
            code = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except SessionError as exc:  # StaleWriteError, SessionEnded: the stream is elsewhere or over
            code = "FAILED_PRECONDITION"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # a bug or a device failure: say so, keep serving
            code = "INTERNAL"
            log.exception("decode block failed", stream_id=request.stream_id, seq=request.seq)
            await context.abort(grpc.StatusCode.INTERNAL, f"decoder failed: {type(exc).__name__}: {exc}")
        finally:
            metrics.DECODER_ACTIVE_STREAMS.dec()
            metrics.DECODER_REQUESTS.labels(code).inc()

    async def EndStream(self, request, context):
        try:
            await self.states.delete(request.stream_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}",
                                trailing_metadata=(NO_RETRY,))
        return decoder_pb2.EndStreamResponse()


def decoder_replica(settings: DecoderSettings, decoder: AudioDecoder, states: DecoderStateStore):
    """(runner, servicer) of one replica: its gRPC server (health, reflection, batcher) around a
    loaded decoder and its stream-state store, not yet started. serve() composes it for a pod, the tests
    around a decoder loaded once."""
    from vitaserve.common.grpc_server import ServiceRunner, make_server

    servicer = DecoderServicer(decoder, states, settings.max_batch, settings.max_wait_ms, settings.ode_steps,
                               settings.deterministic)
    server = make_server(max_message_bytes=16 * 1024 * 1024, max_connection_age_s=settings.max_connection_age_s,
                         max_connection_age_grace_s=settings.max_connection_age_grace_s)
    decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
    runner = ServiceRunner(server, [decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name], settings.port,
                           host=settings.host, batchers=[servicer.batcher], tls=settings.tls,
                           health_port=settings.health_port)
    return runner, servicer


async def serve(settings: DecoderSettings, ready=None) -> None:
    """Load the decoder, connect to Redis, serve until SIGTERM/SIGINT, then drain for settings.grace_s."""
    from vitaserve.common.grpc_server import start_metrics
    from vitaserve.common.redis_retry import RedisRetry
    from vitaserve.common.session_store import connect_redis

    decoder = AudioDecoder.from_pretrained(settings.decoder, device=settings.device)
    states = DecoderStateStore(connect_redis(settings.redis_url, tls=settings.redis_tls), retry=RedisRetry(
        on_retry=lambda what, attempt, exc: metrics.STORE_RETRIES.labels(what).inc()))
    runner, _ = decoder_replica(settings, decoder, states)
    start_metrics(settings.metrics_port)
    await runner.start()
    log.info("decoder serving", port=runner.port, decoder=settings.decoder, max_batch=settings.max_batch)
    if ready is not None:
        ready(runner)
    await runner.serve_until_signal(settings.grace_s)
