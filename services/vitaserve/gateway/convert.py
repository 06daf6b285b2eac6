"""Every translation between the wire (vita.audio.v1 messages, gRPC status codes) and the gateway's types.

Codec enum <-> codec name, AudioFormat <-> OutputFormat, a caller's options -> GenerationOptions,
a failure -> (status code, message for the caller), and float samples <-> the PCM bytes the encoder
and decoder messages carry. A bad value raises CallError with the status code it deserves, so the
edge only has to pass it on.
"""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import structlog

from vitaserve.api import audio_pb2
from vitaserve.common.session_types import (SessionEnded, SessionNotFound, StaleWriteError, StoreFull,
                                            StoreUnavailable)
from vitaserve.gateway.codecs import CODEC_ENUM, AudioFormatError, OutputFormat, check_format
from vitaserve.gateway.generator_client import GenerationOptions, GeneratorError
from vitaserve.gateway.settings import GatewaySettings
from vitaserve.lmtext.prompt import PromptTooLong
from vitaserve.lmtext.sampling_params import SamplingParams
from vitaserve.lmtext.schedule import Schedule

log = structlog.get_logger(__name__)

CODEC_NAMES = {enum: name for name, enum in CODEC_ENUM.items()}  # wire enum -> codec name (gateway.codecs)


class CallError(Exception):
    """A call or request the gateway refuses; `code` is the gRPC status the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


# ---- audio formats --------------------------------------------------------------------------------

def output_format(fmt: audio_pb2.AudioFormat, what: str) -> OutputFormat:
    """The checked format of a wire AudioFormat; `what` names the field in the error."""
    if fmt.codec not in CODEC_NAMES:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: unknown or unset codec ({fmt.codec})")
    try:
        codec = check_format(CODEC_NAMES[fmt.codec], fmt.sample_rate)
    except AudioFormatError as exc:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}") from None
    return OutputFormat(codec, fmt.sample_rate)


def wire_format(fmt: OutputFormat) -> audio_pb2.AudioFormat:
    return audio_pb2.AudioFormat(codec=CODEC_ENUM[fmt.codec], sample_rate=fmt.sample_rate)


# ---- generation options ---------------------------------------------------------------------------

def generation_options(mode: str, sampling: audio_pb2.SamplingOptions, max_new_tokens: int, *,
                       settings: GatewaySettings, num_mtp_modules: int) -> GenerationOptions:
    """Options of one answer; a bad mode or sampling value raises CallError(INVALID_ARGUMENT)."""
    mode = mode or settings.default_mode
    try:
        Schedule.parse(mode, num_mtp_modules)
    except ValueError as exc:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"mode: {exc}") from None
    context = settings.context_tokens
    if not 0 <= max_new_tokens < context:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"max_new_tokens must be in [0, {context}) (0 = the server default; the "
                        f"context holds {context} tokens of prompt and answer), got {max_new_tokens}")

    def opt(name):
        return getattr(sampling, name) if sampling.HasField(name) else None

    options = GenerationOptions(
        mode=mode, max_new_tokens=max_new_tokens or settings.max_new_tokens,
        greedy=opt("greedy"), temperature=opt("temperature"), top_k=opt("top_k"), top_p=opt("top_p"),
        repetition_penalty=opt("repetition_penalty"), seed=opt("seed"))
    given = {k: getattr(options, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}
    try:  # the engine's own rules, so a bad value never reaches (or hurts) the generator
        SamplingParams(do_sample=not options.greedy, **{k: v for k, v in given.items() if v is not None}).validated()
    except ValueError as exc:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {exc}") from None
    return options


# ---- failures -> status ---------------------------------------------------------------------------

def turn_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message of a failed turn (or Synthesize, Transcribe).

    What the caller did wrong is said plainly; what failed inside (a backend's status details, a
    replica's address, an exception) is not: the caller gets a short message and an error id, and
    the details go to the log under that id."""
    if isinstance(exc, CallError):
        return exc.code, str(exc)
    if isinstance(exc, PromptTooLong):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc}: ask for fewer max_new_tokens or speak a shorter turn"
    if isinstance(exc, GeneratorError) and exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        return exc.code, f"generator: {exc}"  # about the caller's own request (prompt, mode, sampling)
    if isinstance(exc, StaleWriteError):
        return grpc.StatusCode.ABORTED, hidden(exc, "the session was taken over by another connection")
    if isinstance(exc, (SessionNotFound, SessionEnded)):
        return grpc.StatusCode.NOT_FOUND, hidden(exc, "the session is gone (ended or expired)")
    if isinstance(exc, StoreFull):  # before StoreUnavailable, its base
        return grpc.StatusCode.RESOURCE_EXHAUSTED, hidden(exc, STORE_FULL_TURN)
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, hidden(exc, "the session store is unavailable")
    if isinstance(exc, grpc.aio.AioRpcError):
        # a backend's CANCELLED is a replica stopping under the call, not the caller cancelling
        code = grpc.StatusCode.UNAVAILABLE if exc.code() == grpc.StatusCode.CANCELLED else exc.code()
        return code, hidden(exc, f"a backend service failed ({code.name})")
    if isinstance(exc, GeneratorError) and exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return exc.code, hidden(exc, "the generator is at capacity: try again shortly")
    if isinstance(exc, GeneratorError):
        return exc.code, hidden(exc, f"the generator failed ({exc.code.name})")
    return grpc.StatusCode.INTERNAL, hidden(exc, "internal error")


def call_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a whole Converse call ends with when it fails (a failed turn does not end it)."""
    if isinstance(exc, CallError):
        return exc.code, str(exc)
    if isinstance(exc, StoreFull):  # a new call refused so that the running ones keep room
        return grpc.StatusCode.RESOURCE_EXHAUSTED, hidden(exc, STORE_FULL_CALL)
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, hidden(exc, "the session store is unavailable")
    return grpc.StatusCode.INTERNAL, hidden(exc, "internal error")


# A full session store (Redis at its memory limit): RESOURCE_EXHAUSTED, not UNAVAILABLE, because
# retrying at once does not help; what the caller can do is said.
STORE_FULL_CALL = "the service is at capacity (session storage is full): no new calls now, try again later"
STORE_FULL_TURN = "the session storage is full: this turn could not be saved; the call goes on"


def hidden(exc: BaseException, summary: str) -> str:
    """`summary (error id X)` for the caller; the exception itself is logged under X."""
    error_id = uuid.uuid4().hex[:12]
    log.warning("failure hidden from the caller", error_id=error_id, summary=summary, error=repr(exc))
    return f"{summary} (error id {error_id})"


# ---- PCM as the encoder and decoder messages carry it ---------------------------------------------

def encoder_pcm16(samples: np.ndarray) -> bytes:
    """EncodeRequest.pcm16: float samples clipped to [-1, 1], scaled by 32767, int16 little-endian."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def decoder_samples(pcm_f32: bytes) -> np.ndarray:
    """DecodeBlockResponse.pcm_f32: float32 little-endian samples (a read-only view of the bytes)."""
    return np.frombuffer(pcm_f32, dtype="<f4")
