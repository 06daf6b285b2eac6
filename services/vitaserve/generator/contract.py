"""The Triton tensor contract of vita_generator, for both sides: the gateway's client and the model.

One request = a prompt plus `GenerationOptions` as input tensors; one response per new token as
output tensors (`GeneratedToken`). Everything here works on numpy arrays and plain values, so it
needs neither torch nor tritonclient nor triton_python_backend_utils: each side wraps the arrays in
its own InferInput / pb_utils.Tensor. config.pbtxt documents each tensor; keep the two in step.

The turn's trace (vitaserve.common.tracing) travels as request parameters, not tensors: `traceparent`,
`vita-session` (a hash) and `vita-turn`; the model reads them with `request_trace` and logs them.

A failed request: Triton's gRPC stream carries it as a message string only (no status code), so the
model puts the code in front of the message as "[CODE] message", and the client reads it back with
`parse_error`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vitaserve.common.tracing import Trace

MODEL_NAME = "vita_generator"  # the model's folder in the repository and its name in requests
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_dtype: str  # as tritonclient names it; config.pbtxt writes TYPE_<dtype> (BYTES: TYPE_STRING)
    numpy_dtype: type


# -- inputs: PROMPT_IDS always; MAX_NEW_TOKENS always from our client; the rest only when set -------------
PROMPT_IDS = TensorSpec("PROMPT_IDS", "INT64", np.int64)
MODE = TensorSpec("MODE", "BYTES", np.object_)
MAX_NEW_TOKENS = TensorSpec("MAX_NEW_TOKENS", "INT32", np.int32)
GREEDY = TensorSpec("GREEDY", "BOOL", np.bool_)
TEMPERATURE = TensorSpec("TEMPERATURE", "FP32", np.float32)
TOP_K = TensorSpec("TOP_K", "INT32", np.int32)
TOP_P = TensorSpec("TOP_P", "FP32", np.float32)
REPETITION_PENALTY = TensorSpec("REPETITION_PENALTY", "FP32", np.float32)
SEED = TensorSpec("SEED", "INT64", np.int64)
INPUTS = (PROMPT_IDS, MODE, MAX_NEW_TOKENS, GREEDY, TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY, SEED)

# -- outputs: one of each per response (one response per new token) -----------------------------------
TOKEN_ID = TensorSpec("TOKEN_ID", "INT64", np.int64)
IS_AUDIO = TensorSpec("IS_AUDIO", "BOOL", np.bool_)
STEP_KIND = TensorSpec("STEP_KIND", "BYTES", np.object_)
INDEX = TensorSpec("INDEX", "INT32", np.int32)
FINISHED = TensorSpec("FINISHED", "BOOL", np.bool_)
OUTPUTS = (TOKEN_ID, IS_AUDIO, STEP_KIND, INDEX, FINISHED)

SPECS = {spec.name: spec for spec in INPUTS + OUTPUTS}


@dataclass(frozen=True)
class GenerationOptions:
    """What a caller may set besides the prompt; None keeps the checkpoint's generation_config.json."""

    mode: str | None = None  # vanilla | balance | boost | turbo | "1,10,4,10"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    greedy: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def sampling_overrides(self) -> dict:
        """Keyword overrides for SamplingParams.from_defaults: greedy switches sampling off, greedy
        False or None keeps the checkpoint's do_sample; None values keep their defaults."""
        return {"do_sample": False if self.greedy else None, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "repetition_penalty": self.repetition_penalty,
                "seed": self.seed}


@dataclass(frozen=True)
class GeneratedToken:
    """One response: a new token as it crosses the wire."""

    index: int  # 0-based among the new tokens
    token_id: int
    is_audio: bool
    kind: str  # "M": backbone step, "m": MCTP step
    finished: bool  # the last token; its response carries Triton's FINAL flag


# The optional scalar inputs and the GenerationOptions field each one carries, with its cast.
_OPTIONAL_SCALARS = ((GREEDY, "greedy", bool), (TEMPERATURE, "temperature", float), (TOP_K, "top_k", int),
                     (TOP_P, "top_p", float), (REPETITION_PENALTY, "repetition_penalty", float),
                     (SEED, "seed", int))


def _array(spec: TensorSpec, values) -> np.ndarray:
    return np.asarray(values, dtype=spec.numpy_dtype).reshape(-1)


def _scalar(array: np.ndarray | None, cast):
    if array is None:
        return None
    value = np.asarray(array).reshape(-1)[0]
    return cast(value.decode() if isinstance(value, bytes) else value)


def request_arrays(prompt_ids: list[int], opts: GenerationOptions) -> dict[str, np.ndarray]:
    """The input tensors of one request, by name (the client sends exactly these)."""
    arrays = {PROMPT_IDS.name: _array(PROMPT_IDS, prompt_ids),
              MAX_NEW_TOKENS.name: _array(MAX_NEW_TOKENS, [opts.max_new_tokens])}
    if opts.mode:
        arrays[MODE.name] = _array(MODE, [opts.mode.encode()])
    for spec, field, _ in _OPTIONAL_SCALARS:
        value = getattr(opts, field)
        if value is not None:
            arrays[spec.name] = _array(spec, [value])
    return arrays


def parse_request(get: Callable[[str], np.ndarray | None]) -> tuple[list[int], GenerationOptions]:
    """(prompt ids, options) from the input tensors; `get(name)` returns an array, or None when absent.
    ValueError / TypeError for a missing prompt or an ill-typed value."""
    prompt = get(PROMPT_IDS.name)
    if prompt is None:
        raise ValueError(f"input {PROMPT_IDS.name} is missing")
    optional = {field: _scalar(get(spec.name), cast) for spec, field, cast in _OPTIONAL_SCALARS}
    options = GenerationOptions(
        mode=_scalar(get(MODE.name), str) or None,
        max_new_tokens=_scalar(get(MAX_NEW_TOKENS.name), int) or DEFAULT_MAX_NEW_TOKENS,
        **optional,
    )
    return [int(t) for t in np.asarray(prompt).reshape(-1).tolist()], options


def token_arrays(token) -> dict[str, np.ndarray]:
    """The output tensors of one response; `token` is a GeneratedToken or anything with its fields
    (the engine's TokenEvent)."""
    return {
        TOKEN_ID.name: _array(TOKEN_ID, [token.token_id]),
        IS_AUDIO.name: _array(IS_AUDIO, [token.is_audio]),
        STEP_KIND.name: _array(STEP_KIND, [token.kind.encode()]),
        INDEX.name: _array(INDEX, [token.index]),
        FINISHED.name: _array(FINISHED, [token.finished]),
    }


def parse_token(get: Callable[[str], np.ndarray]) -> GeneratedToken:
    """A GeneratedToken from one response's output tensors; `get(name)` returns an array."""
    return GeneratedToken(
        index=_scalar(get(INDEX.name), int), token_id=_scalar(get(TOKEN_ID.name), int),
        is_audio=_scalar(get(IS_AUDIO.name), bool), kind=_scalar(get(STEP_KIND.name), str),
        finished=_scalar(get(FINISHED.name), bool),
    )


def request_trace(parameters_json: str) -> Trace:
    """The trace of a request from its parameters (Triton's request.parameters(), a JSON object): the
    gateway's trace continued, or a new one when the request carries none or a malformed one."""
    try:
        parameters = json.loads(parameters_json or "{}")
    except ValueError:
        parameters = {}
    return Trace.incoming(parameters.items() if isinstance(parameters, dict) else ())


# -- errors ------------------------------------------------------------------------------------------
# grpc.StatusCode names the model may report; anything else is read as INTERNAL.
INVALID_ARGUMENT = "INVALID_ARGUMENT"   # the request itself is wrong (prompt, mode, sampling values)
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # the engine is full: retry later or elsewhere
CANCELLED = "CANCELLED"                 # the caller cancelled
UNAVAILABLE = "UNAVAILABLE"             # the engine is stopping
INTERNAL = "INTERNAL"                   # a failure of ours
CODES = (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED, UNAVAILABLE, INTERNAL)

_TAGGED = re.compile(r"\[([A-Z_]+)\] (.*)", re.S)


def error_text(code: str, message: str) -> str:
    if code not in CODES:
        raise ValueError(f"unknown error code {code!r}")
    return f"[{code}] {message}"


def parse_error(text: str) -> tuple[str, str]:
    """(code, message) of an error string from the model. Untagged text comes from Triton itself:
    UNAVAILABLE when it says the model is not ready or not loaded (a Triton stopping or starting
    answers "Request for unknown model: '...' has no available versions"), else INTERNAL."""
    m = _TAGGED.search(text)
    if m and m.group(1) in CODES:
        return m.group(1), m.group(2)
    not_serving = ("not ready", "unavailable", "unknown model", "no available versions")
    return (UNAVAILABLE if any(s in text.lower() for s in not_serving) else INTERNAL), text
