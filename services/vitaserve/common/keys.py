"""Every Redis key, prefix, TTL and size default of vitaserve, in one place (as arq/constants.py).

Layout (namespace "vita" by default; one namespace per deployment, so two clusters can share a
Redis and a test can take a fresh one):

  vita:session:{<sid>}           hash   one call: config, turn counter, status, owner, fence
  vita:session:{<sid>}:history   list   finished turns, oldest first, one compact JSON per turn
  vita:decoder:{<stream_id>}     hash   one audio stream's decoder state: seq, data (bytes)

The braces are Redis Cluster hash tags: both keys of a session land in the same slot, so the Lua
scripts that touch both stay legal on a cluster; a decoder stream is a tag of its own.
"""

from __future__ import annotations

import re

DEFAULT_NAMESPACE = "vita"

SESSION_PREFIX = "session"
HISTORY_SUFFIX = "history"
DECODER_PREFIX = "decoder"

# TTLs: an idle call expires after 30 min; a decoder stream lives between chunks of one answer.
SESSION_TTL_S = 1800
DECODER_STATE_TTL_S = 120

# Size bounds. A turn of 60 s of speech is 750 audio tokens and an answer a few thousand ids:
# ~30 KB as JSON, so 256 KiB leaves room without letting one call fill Redis.
MAX_HISTORY_TURNS = 64
MAX_TURN_BYTES = 256 * 1024
MAX_SYSTEM_PROMPT_BYTES = 32 * 1024
# stream_state.py: ~27.6 KB per second of answer, so a 60 s answer is ~1.7 MB.
MAX_DECODER_STATE_BYTES = 16 * 1024 * 1024

# Retry of transient Redis failures (connection refused/reset, timeouts, loading, read-only
# replica during a failover): bounded in attempts AND total time, exponential backoff.
RETRY_ATTEMPTS = 4
RETRY_MAX_S = 2.0
RETRY_BACKOFF_S = 0.05  # first wait; doubles per attempt, capped at RETRY_BACKOFF_CAP_S
RETRY_BACKOFF_CAP_S = 0.5

# Namespaces and stream ids become parts of keys: no braces (hash tags), no spaces or globs.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_STREAM_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_SESSION_ID_RE = re.compile(r"[0-9a-f]{32}")


class InvalidKeyPart(ValueError):
    """A namespace, session id or stream id that cannot be part of a key."""


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidKeyPart(
            f"namespace {namespace!r} is not valid: use 1-64 of letters, digits, '_', '.', '-'"
        )
    return namespace


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
        raise InvalidKeyPart(
            f"session id {session_id!r} is not valid: expected 32 lowercase hex digits (uuid4 hex)"
        )
    return session_id


def check_stream_id(stream_id: str) -> str:
    if not isinstance(stream_id, str) or not _STREAM_ID_RE.fullmatch(stream_id):
        raise InvalidKeyPart(
            f"decoder stream id {stream_id!r} is not valid: use 1-128 of letters, digits, "
            "'_', '.', ':', '-'"
        )
    return stream_id


def session_key(namespace: str, session_id: str) -> str:
    return f"{namespace}:{SESSION_PREFIX}:{{{session_id}}}"


def history_key(namespace: str, session_id: str) -> str:
    return f"{namespace}:{SESSION_PREFIX}:{{{session_id}}}:{HISTORY_SUFFIX}"


def decoder_state_key(namespace: str, stream_id: str) -> str:
    return f"{namespace}:{DECODER_PREFIX}:{{{stream_id}}}"
