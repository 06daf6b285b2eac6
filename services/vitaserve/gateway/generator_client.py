"""Async client of the Triton generator: one decoupled stream per answer, cancellable at once.

Cancelling the iteration (barge-in, hang-up) cancels the gRPC call; Triton marks the request
cancelled and the engine drops it at its next step, so GPU work stops.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from vitaserve.generator import contract

MODEL_NAME = "vita_generator"


class GeneratorError(Exception):
    """The generator rejected or failed a request; `code` is the grpc.StatusCode it reported."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        super().__init__(message)
        self.code = code

    @classmethod
    def from_text(cls, text: str) -> "GeneratorError":
        code, message = contract.parse_error(text)
        return cls(message, grpc.StatusCode[code])


@dataclass(frozen=True)
class GeneratedToken:
    index: int
    token_id: int
    is_audio: bool
    kind: str
    finished: bool


@dataclass(frozen=True)
class GenerationOptions:
    mode: str | None = None
    max_new_tokens: int = 1024
    greedy: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


def _input(name: str, value, dtype: str, np_dtype) -> InferInput:
    arr = np.asarray(value, dtype=np_dtype).reshape(-1)
    tensor = InferInput(name, list(arr.shape), dtype)
    tensor.set_data_from_numpy(arr)
    return tensor


def build_inputs(prompt_ids: list[int], opts: GenerationOptions) -> list[InferInput]:
    inputs = [
        _input("PROMPT_IDS", prompt_ids, "INT64", np.int64),
        _input("MAX_NEW_TOKENS", [opts.max_new_tokens], "INT32", np.int32),
    ]
    if opts.mode:
        inputs.append(_input("MODE", [opts.mode.encode()], "BYTES", np.object_))
    optional = [("GREEDY", opts.greedy, "BOOL", np.bool_), ("TEMPERATURE", opts.temperature, "FP32", np.float32),
                ("TOP_K", opts.top_k, "INT32", np.int32), ("TOP_P", opts.top_p, "FP32", np.float32),
                ("REPETITION_PENALTY", opts.repetition_penalty, "FP32", np.float32),
                ("SEED", opts.seed, "INT64", np.int64)]
    inputs += [_input(name, [v], dt, npd) for name, v, dt, npd in optional if v is not None]
    return inputs


async def _closes_by_itself(stream, timeout_s: float = 2.0) -> bool:
    """After the last token (it carries Triton's FINAL flag) let the server end the stream. Cancelling
    a stream the server is completing races Triton's gRPC frontend (2.41), which then keeps the
    request's state and waits its whole exit timeout at shutdown; measured with 12 concurrent calls."""
    async def drain() -> None:
        async for _ in stream:
            pass

    try:
        await asyncio.wait_for(drain(), timeout_s)
        return True
    except (asyncio.TimeoutError, grpc.RpcError, InferenceServerException):
        return False


class GeneratorClient:
    def __init__(self, url: str, model: str = MODEL_NAME):
        self.url = url
        self.model = model
        self._client = triton_aio.InferenceServerClient(url)

    async def ready(self) -> bool:
        try:
            return await self._client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    async def generate(self, prompt_ids: list[int], opts: GenerationOptions,
                       request_id: str | None = None, timeout_s: float | None = None) -> AsyncIterator[GeneratedToken]:
        request = {"model_name": self.model, "inputs": build_inputs(prompt_ids, opts),
                   "request_id": request_id or uuid.uuid4().hex}

        async def one_request():
            yield request

        stream = self._client.stream_infer(one_request(), stream_timeout=timeout_s)
        closed = False
        try:
            async for result, error in stream:
                if error is not None:
                    raise GeneratorError.from_text(str(error.message() if hasattr(error, "message") else error))
                token = GeneratedToken(
                    index=int(result.as_numpy("INDEX")[0]), token_id=int(result.as_numpy("TOKEN_ID")[0]),
                    is_audio=bool(result.as_numpy("IS_AUDIO")[0]), kind=result.as_numpy("STEP_KIND")[0].decode(),
                    finished=bool(result.as_numpy("FINISHED")[0]),
                )
                yield token
                if token.finished:
                    closed = await _closes_by_itself(stream)
                    return
        finally:
            if not closed:  # the caller stopped early (barge-in, an error): cancel the request in Triton
                stream.cancel()

    async def close(self) -> None:
        await self._client.close()
