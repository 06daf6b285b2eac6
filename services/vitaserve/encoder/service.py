"""The Encoder gRPC service: PCM in, GLM-4-Voice audio token ids out; concurrent calls batched."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import numpy as np
import structlog

from vitaserve.api import encoder_pb2, encoder_pb2_grpc
from vitaserve.common import metrics
from vitaserve.common.batcher import BatcherFull, BatcherStopped, MicroBatcher
from vitaserve.common.resample import resample
from vitaserve.encoder.settings import EncoderSettings

if TYPE_CHECKING:
    from vitaserve.common.grpc_server import ServiceRunner

log = structlog.get_logger(__name__)

TOKENIZER_RATE = 16000
MAX_AUDIO_S = 120.0
ALLOWED_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
# the longest request (MAX_AUDIO_S at the highest rate) must reach validate() to get a clear error
MAX_MESSAGE_BYTES = int(MAX_AUDIO_S * max(ALLOWED_RATES) * 2) + 64 * 1024


class EncodeInputError(ValueError):
    """A request the encoder cannot tokenize; the message says why (gRPC INVALID_ARGUMENT)."""


def validate(request: encoder_pb2.EncodeRequest) -> np.ndarray:
    """PCM16 bytes -> float32 16 kHz samples, or EncodeInputError with the reason."""
    if request.sample_rate not in ALLOWED_RATES:
        raise EncodeInputError(f"sample_rate {request.sample_rate} not supported; use one of {ALLOWED_RATES}")
    if len(request.pcm16) % 2:
        raise EncodeInputError("pcm16 has an odd number of bytes: it must be whole 16-bit samples")
    if not request.pcm16:
        raise EncodeInputError("pcm16 is empty")
    seconds = len(request.pcm16) / 2 / request.sample_rate
    if seconds > MAX_AUDIO_S:
        raise EncodeInputError(f"{seconds:.1f} s of audio is over the {MAX_AUDIO_S:.0f} s limit of one request")
    samples = np.frombuffer(request.pcm16, dtype="<i2").astype(np.float32) / 32768.0
    if request.sample_rate != TOKENIZER_RATE:
        samples = resample(samples, request.sample_rate, TOKENIZER_RATE)
        if samples.size == 0:
            raise EncodeInputError(f"{len(request.pcm16) // 2} samples at {request.sample_rate} Hz are "
                                   f"shorter than one sample at {TOKENIZER_RATE} Hz")
    return samples


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    """Validates each request, then lets the batcher share one tokenizer forward among concurrent calls."""

    def __init__(self, tokenizer, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.tokenizer = tokenizer
        self.batcher: MicroBatcher[np.ndarray, list[int]] = MicroBatcher(
            lambda waves: tokenizer.encode(list(waves), TOKENIZER_RATE), max_batch, max_wait_ms, self._observe)

    @staticmethod
    def _observe(size: int, compute_ms: float, queue_ms: list[float]) -> None:
        metrics.ENCODER_BATCH_SIZE.observe(size)
        metrics.ENCODER_COMPUTE_MS.observe(compute_ms)
        for q in queue_ms:
            metrics.ENCODER_QUEUE_MS.observe(q)

    async def Encode(self, request, context):
        code = "OK"
        metrics.ENCODER_IN_FLIGHT.inc()
        try:
            samples = validate(request)
            tokens, info = await self.batcher.submit_with_info(samples)
            # one line per request: with the trace fields (tracing.TraceInterceptor) it ties the turn's hops together
            log.info("encoded", audio_s=round(len(samples) / TOKENIZER_RATE, 3), tokens=len(tokens),
                     queue_ms=round(info.queue_ms, 1), compute_ms=round(info.compute_ms, 1), batch=info.size)
            return encoder_pb2.EncodeResponse(tokens=tokens, audio_s=len(samples) / TOKENIZER_RATE,
                                              queue_ms=info.queue_ms, compute_ms=info.compute_ms,
                                              batch_size=info.size)
        except ValueError as exc:  # validate(), or the tokenizer's own checks
            code = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BatcherFull as exc:  # overload: refused at once, the gateway retries another replica
            code = "RESOURCE_EXHAUSTED"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except BatcherStopped as exc:
            code = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:  # a bug or a device failure: say so, keep serving
            code = "INTERNAL"
            log.exception("encode failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"encoder failed: {type(exc).__name__}: {exc}")
        finally:
            metrics.ENCODER_IN_FLIGHT.dec()
            metrics.ENCODER_REQUESTS.labels(code).inc()


def encoder_replica(settings: EncoderSettings, tokenizer) -> tuple[ServiceRunner, EncoderServicer]:
    """(runner, servicer) of one replica: its gRPC server (health, reflection, batcher) around a
    loaded tokenizer, not yet started. serve() composes it for a pod, the tests around a tokenizer
    loaded once."""
    from vitaserve.common.grpc_server import ServiceRunner, make_server

    servicer = EncoderServicer(tokenizer, settings.max_batch, settings.max_wait_ms)
    server = make_server(max_message_bytes=MAX_MESSAGE_BYTES, max_connection_age_s=settings.max_connection_age_s,
                         max_connection_age_grace_s=settings.max_connection_age_grace_s)
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server)
    runner = ServiceRunner(server, [encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name], settings.port,
                           host=settings.host, batchers=[servicer.batcher], tls=settings.tls,
                           health_port=settings.health_port)
    return runner, servicer


async def serve(settings: EncoderSettings, ready=None) -> None:
    """Load the tokenizer, serve until SIGTERM/SIGINT, then drain for settings.grace_s."""
    from vitaserve.common.grpc_server import start_metrics
    from vitaserve.encoder.tokenizer import SpeechTokenizer

    tokenizer = SpeechTokenizer.from_pretrained(settings.tokenizer, device=settings.device)
    runner, _ = encoder_replica(settings, tokenizer)
    start_metrics(settings.metrics_port)
    await runner.start()
    log.info("encoder serving", port=runner.port, tokenizer=settings.tokenizer)
    if ready is not None:
        ready(runner)
    await runner.serve_until_signal(settings.grace_s)
