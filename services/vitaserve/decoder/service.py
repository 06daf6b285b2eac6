"""The Decoder gRPC service: one audio block per call; the stream's state lives in Redis.

Block `seq` loads the state stored after block seq-1, decodes, then stores the state it started
from under "<stream>:prev" and the new one under "<stream>" (both seq-fenced), so any replica can
serve the next block. A retried block whose first attempt already stored its state (the reply was
lost) is recomputed from "<stream>:prev" and changes nothing in Redis. The final block is retried
the same way, so both keys stay until EndStream (or their TTL) removes them.

Concurrent blocks of different streams share one flow and one HiFT forward when their shapes are
equal (`AudioDecoder.batch_key`: the same block of streams cut by the same chunk plan, such as the
first blocks of calls answering at once); each stream keeps its own noise generator, so its audio
does not depend on its batch-mates. Other blocks queue for the next forward, the block due soonest
first: a block is due at its request time plus the audio its caller still has buffered
(playback_slack_s), so first blocks, which someone is waiting for, overtake later ones.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import structlog

from vitaserve.api import decoder_pb2, decoder_pb2_grpc
from vitaserve.common import metrics
from vitaserve.common.batcher import BatcherStopped, MicroBatcher
from vitaserve.common.session_store import (
    SessionEnded,
    SessionError,
    SessionNotFound,
    SessionStore,
    StaleWriteError,
    StoreUnavailable,
)
from vitaserve.decoder.audio_decoder import AudioDecoder, Block
from vitaserve.decoder.stream_state import DecoderStreamState

log = structlog.get_logger(__name__)

STREAM_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,120}")  # room for the ':prev' suffix
PREV = ":prev"
MAX_BLOCK_TOKENS = 400
MAX_ODE_STEPS = 50
CODEBOOK = 16384
MAX_SLACK_S = 3600.0


class DecodeInputError(ValueError):
    """A request the decoder cannot serve as sent; the message says why (gRPC INVALID_ARGUMENT)."""


def check_stream_id(stream_id: str) -> str:
    if not STREAM_ID.fullmatch(stream_id):
        raise DecodeInputError("stream_id must be 1..120 characters of letters, digits, '_', '-', '.', ':'")
    if stream_id.endswith(PREV):
        raise DecodeInputError(f"stream_id must not end in {PREV!r} (the service keeps its own key there)")
    return stream_id


def validate(request: decoder_pb2.DecodeBlockRequest) -> None:
    check_stream_id(request.stream_id)
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

    def __init__(self, decoder, store: SessionStore, max_batch: int = 8, max_wait_ms: float = 2.0,
                 default_ode_steps: int = 10, deterministic: bool = False):
        self.decoder = decoder
        self.store = store
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
        """(state to start from, its stored bytes or None for a new stream, is_retry)."""
        stored = await self.store.get_decoder_state(stream_id)
        if seq == 0:
            if stored is None:
                return self.decoder.start_stream(deterministic=self.deterministic), None, False
            if stored[0] == 0:
                return self.decoder.start_stream(deterministic=self.deterministic), None, True
            raise StaleWriteError(f"stream {stream_id} already has blocks up to {stored[0]}; block 0 cannot restart it")
        if stored is None:
            raise SessionNotFound(f"stream {stream_id} is unknown or expired (no state for block {seq - 1})")
        data, retry = stored[1], False
        if stored[0] == seq:
            prev = await self.store.get_decoder_state(stream_id + PREV)
            if prev is None or prev[0] != seq - 1:
                raise StaleWriteError(f"stream {stream_id} already decoded block {seq} and its previous "
                                      "state is gone; the block cannot be recomputed")
            data, retry = prev[1], True
        elif stored[0] != seq - 1:
            raise StaleWriteError(f"stream {stream_id} is at block {stored[0]}; block {seq} cannot follow it")
        state = DecoderStreamState.from_bytes(data)
        if state.finalized:
            raise SessionEnded(f"stream {stream_id} was finalized at block {seq - 1}; start a new stream")
        return state, data, retry

    async def _store(self, request, start_bytes: bytes | None, new_state) -> int:
        """Fenced writes of the state before and after this block; returns the new state's size."""
        if request.seq > 0:
            await self.store.put_decoder_state(request.stream_id + PREV, request.seq - 1, start_bytes)
        data = new_state.to_bytes()
        metrics.DECODER_STATE_BYTES.observe(len(data))
        try:
            await self.store.put_decoder_state(request.stream_id, request.seq, data)
        except StaleWriteError:
            # Another attempt at this same block (a client retry after a deadline, on another
            # replica) stored it while we computed: same state and PCM, so answer as a retry.
            stored = await self.store.get_decoder_state(request.stream_id)
            if stored is None or stored[0] != request.seq:
                raise
            return 0
        return len(data)

    async def DecodeBlock(self, request, context):
        code = "OK"
        metrics.DECODER_ACTIVE_STREAMS.inc()
        try:
            validate(request)
            state, start_bytes, retry = await self._load(request.stream_id, request.seq)
            steps = request.ode_steps or self.default_ode_steps
            if request.seq > 0:
                metrics.DECODER_PLAYBACK_SLACK_S.observe(request.playback_slack_s)
            block = Block(state, tuple(request.tokens), request.finalize, steps)
            (pcm, new_state), info = await self.batcher.submit_with_info(block, request.playback_slack_s)
            metrics.DECODER_BLOCK_MS.labels(str(request.seq == 0).lower()).observe(info.compute_ms)
            state_bytes = 0 if retry else await self._store(request, start_bytes, new_state)
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
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}")
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
            check_stream_id(request.stream_id)
            await self.store.delete_decoder_state(request.stream_id)
            await self.store.delete_decoder_state(request.stream_id + PREV)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}")
        return decoder_pb2.EndStreamResponse()


async def serve(decoder_dir: str, port: int, redis_url: str, metrics_port: int = 0, device: str = "cpu",
                max_batch: int = 8, max_wait_ms: float = 2.0, ode_steps: int = 10, deterministic: bool = False,
                grace_s: float = 10.0, ready=None) -> None:
    from vitaserve.common.grpc_server import ServiceRunner, make_server, start_metrics
    from vitaserve.common.session_store import connect_redis
    decoder = AudioDecoder.from_pretrained(decoder_dir, device=device)
    store = SessionStore(connect_redis(redis_url),
                         on_retry=lambda what, attempt, exc: metrics.STORE_RETRIES.labels(what).inc())
    servicer = DecoderServicer(decoder, store, max_batch, max_wait_ms, ode_steps, deterministic)
    server = make_server(max_message_bytes=16 * 1024 * 1024)
    decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
    runner = ServiceRunner(server, [decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name], port,
                           batchers=[servicer.batcher])
    start_metrics(metrics_port)
    await runner.start()
    log.info("decoder serving", port=runner.port, decoder=decoder_dir, max_batch=max_batch)
    if ready is not None:
        ready(runner)
    await runner.serve_until_signal(grace_s)
