"""What crosses the Triton boundary besides tensors: the status of a failed request.

Triton's gRPC stream carries a failed response as a message string only (no status code), so the
model puts the code in front of the message as "[CODE] message", and the gateway's client reads it
back with `parse_error`. Torch-free: the gateway imports it.
"""

from __future__ import annotations

import re

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
    UNAVAILABLE when it says the model is not ready, else INTERNAL."""
    m = _TAGGED.search(text)
    if m and m.group(1) in CODES:
        return m.group(1), m.group(2)
    return (UNAVAILABLE if "not ready" in text or "unavailable" in text.lower() else INTERNAL), text
