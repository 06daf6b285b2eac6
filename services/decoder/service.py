"""The Decoder gRPC service: one audio block per call; the stream's state lives in Redis.

Block `seq` loads the state stored after block seq-1, decodes, then stores the state it started
from under "<stream>:prev" and the new one under "<stream>" (both seq-fenced), so any replica can
serve the next block. A retried block whose first attempt already stored its state (the reply was
lost) is recomputed from "<stream>:prev" and changes nothing in Redis. The final block is retried
the same way, so both keys stay until EndStream (or their TTL) removes them.
"""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import numpy as np
import structlog

from vitaserve.api import decoder_pb2, decoder_pb2_grpc
from vitaserve.common import metrics
from vitaserve.common.session_store import (
    SessionEnded,
    SessionError,
    SessionNotFound,
    SessionStore,
    StaleWriteError,
    StoreUnavailable,
)

log = structlog.get_logger(__name__)

STREAM_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,120}")  # room for the ':prev' suffix
PREV = ":prev"
MAX_BLOCK_TOKENS = 400
MAX_ODE_STEPS = 50
CODEBOOK = 16384


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


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, decoder, store: SessionStore, workers: int = 1, default_ode_steps: int = 10,
                 deterministic: bool = False):
        self.decoder = decoder
        self.store = store
        self.slots = asyncio.Semaphore(workers)  # decode blocks computed at once on this replica
        self.default_ode_steps = default_ode_steps
        self.deterministic = deterministic

    async def _load(self, stream_id: str, seq: int):
        """(state to start from, its stored bytes or None for a new stream, is_retry)."""
        from vitaserve.decoder.stream_state import DecoderStreamState

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
        try:
            validate(request)
            state, start_bytes, retry = await self._load(request.stream_id, request.seq)
            steps = request.ode_steps or self.default_ode_steps
            queued = time.perf_counter()
            async with self.slots:
                metrics.DECODER_QUEUE_MS.observe((time.perf_counter() - queued) * 1000)
                metrics.DECODER_ACTIVE_STREAMS.inc()
                start = time.perf_counter()
                try:
                    pcm, new_state = await asyncio.to_thread(
                        self.decoder.decode_chunk, state, list(request.tokens), request.finalize, steps)
                finally:
                    metrics.DECODER_ACTIVE_STREAMS.dec()
                compute_ms = (time.perf_counter() - start) * 1000
            metrics.DECODER_BLOCK_MS.labels(str(request.seq == 0).lower()).observe(compute_ms)
            state_bytes = 0 if retry else await self._store(request, start_bytes, new_state)
            return decoder_pb2.DecodeBlockResponse(
                pcm_f32=np.asarray(pcm, dtype="<f4").tobytes(), sample_rate=22050, seq=request.seq,
                compute_ms=compute_ms, state_bytes=state_bytes)
        except ValueError as exc:  # includes StreamStateError, SessionInputError and the decoder's own checks
            code = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SessionNotFound as exc:
            code = "NOT_FOUND"
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except StoreUnavailable as exc:
            code = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}")
        except SessionError as exc:  # StaleWriteError, SessionEnded: the stream is elsewhere or over
            code = "FAILED_PRECONDITION"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # a bug or a device failure: say so, keep serving
            code = "INTERNAL"
            log.exception("decode block failed", stream_id=request.stream_id, seq=request.seq)
            await context.abort(grpc.StatusCode.INTERNAL, f"decoder failed: {type(exc).__name__}: {exc}")
        finally:
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
                workers: int = 1, ode_steps: int = 10, deterministic: bool = False, grace_s: float = 10.0,
                ready=None) -> None:
    from vitaserve.common.grpc_server import ServiceRunner, make_server, start_metrics
    from vitaserve.common.session_store import connect_redis
    from vitaserve.decoder.audio_decoder import AudioDecoder

    decoder = AudioDecoder.from_pretrained(decoder_dir, device=device)
    store = SessionStore(connect_redis(redis_url),
                         on_retry=lambda what, attempt, exc: metrics.STORE_RETRIES.labels(what).inc())
    servicer = DecoderServicer(decoder, store, workers, ode_steps, deterministic)
    server = make_server(max_message_bytes=16 * 1024 * 1024)
    decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
    runner = ServiceRunner(server, [decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name], port)
    start_metrics(metrics_port)
    await runner.start()
    log.info("decoder serving", port=runner.port, decoder=decoder_dir)
    if ready is not None:
        ready(runner)
    await runner.serve_until_signal(grace_s)
