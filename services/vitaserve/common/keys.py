"""Every Redis key, prefix, TTL, size default and record version of vitaserve, in one place (as
arq/constants.py).

Layout (namespace "vita" by default; one namespace per deployment, so two clusters can share a
Redis and a test can take a fresh one):

  key                            type   holds                                  schema written / read
  vita:session:{<sid>}           hash   one call: config, turn counter,        2 / 1, 2
                                        status, owner, fence, op, schema
  vita:session:{<sid>}:history   list   finished turns, oldest first, one      2 / 1, 2
                                        compact JSON per turn, "v" in each
  vita:decoder:{<stream_id>}     hash   one audio stream's decoder state:      2 / 1, 2
                                        schema, seq, data, prev_seq, prev_data
  vita:quota:{<tenant>}:calls    zset   a tenant's call leases: member = lease  -
                                        id, score = expiry (Redis clock, ms)
  vita:quota:{<tenant>}:starts   zset   a tenant's call starts of the last      -
                                        minute: member = start id, score = ms

Session ids are 128 random bits from `secrets` (32 hex digits). A session hash records its
`tenant` (issue 13; a field the previous release ignores, so the schema stays 2): a hash without
it was written before tenants and belongs to ANONYMOUS_TENANT.

Record versions (a rolling upgrade runs two releases against one Redis, so each reads both):
  session hash   1: no `schema` field (the release before versioning)   2: `schema` = "2"; the
                 fields are otherwise the same, so release 1 reads a version 2 hash as its own.
  history turn   1: no "v" key                                          2: "v": 2 first; release 1
                 ignores the extra key.
  decoder state  1: seq, data; the state before the newest block under a second key
                 vita:decoder:{<stream_id>:prev}, written separately (not atomic).
                 2: one hash, `schema` = "2", the previous state in prev_seq/prev_data, all four
                 written by one script. seq/data keep their names, so release 1 still reads it;
                 a version 1 hash reads as a stream with no previous state (its :prev key is
                 ignored), and its next block rewrites it as version 2.
A record of a version newer than this code reads fails with a SessionError naming the version.

The braces are Redis Cluster hash tags: both keys of a session land in the same slot, so the Lua
scripts that touch both stay legal on a cluster; a decoder stream is a tag of its own.
"""

from __future__ import annotations

import re

DEFAULT_NAMESPACE = "vita"

SESSION_PREFIX = "session"
HISTORY_SUFFIX = "history"
DECODER_PREFIX = "decoder"
QUOTA_PREFIX = "quota"

# The tenant of callers without credentials (a gateway with --allow-anonymous), and of sessions
# written before sessions recorded their tenant.
ANONYMOUS_TENANT = "anonymous"

# Record versions written by this release; each reader also accepts every older one (see above).
SESSION_SCHEMA = 2  # the session hash and each history turn
DECODER_STATE_SCHEMA = 2
FIRST_SCHEMA = 1  # what a record without a version field is

# TTLs: an idle call expires after 30 min; a decoder stream lives between chunks of one answer.
SESSION_TTL_S = 1800
# An ended call (HANG_UP) is kept only this long (its history readable, a late resume told it ended),
# so Redis returns to its baseline seconds after the calls end instead of SESSION_TTL_S later.
ENDED_SESSION_TTL_S = 10
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

# A full Redis (maxmemory with noeviction) refuses writes with OOM. New sessions are refused earlier,
# once used_memory passes this fraction of maxmemory, so that calls already running keep room for
# their next turns: with the chart's 1 GB the last 20 % is ~200 MB, i.e. ~6,800 turns of a
# typical 30 KB (MAX_TURN_BYTES at worst: ~800) plus decoder states (~27.6 KB per second of
# answer, overwritten per block, TTL DECODER_STATE_TTL_S). used_memory is read with INFO memory at
# most once per MEMORY_CHECK_S per store: within that second a replica may admit calls it would
# have refused, each adding ~1 KB (a system prompt at most MAX_SYSTEM_PROMPT_BYTES): a burst of
# 1,000 is at most 32 MB, well inside the headroom.
NEW_SESSION_MEMORY_FRACTION = 0.8
MEMORY_CHECK_S = 1.0

# Namespaces and stream ids become parts of keys: no braces (hash tags), no spaces or globs.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_STREAM_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
# Release 1 kept a stream's previous state under "<stream_id>:prev": while a rolling upgrade mixes
# releases such keys exist, so no stream may be called that.
LEGACY_PREV_SUFFIX = ":prev"
_SESSION_ID_RE = re.compile(r"[0-9a-f]{32}")
# Tenants become parts of keys (quotas): the namespace's alphabet.
_TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


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
            f"session id {session_id!r} is not valid: expected 32 lowercase hex digits"
        )
    return session_id


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise InvalidKeyPart(
            f"tenant {tenant!r} is not valid: use 1-64 of letters, digits, '_', '.', '-'"
        )
    return tenant


def check_stream_id(stream_id: str) -> str:
    if not isinstance(stream_id, str) or not _STREAM_ID_RE.fullmatch(stream_id):
        raise InvalidKeyPart(
            f"stream_id must be 1-128 characters of letters, digits, '_', '.', ':', '-'; "
            f"got {stream_id!r}"
        )
    if stream_id.endswith(LEGACY_PREV_SUFFIX):
        raise InvalidKeyPart(
            f"stream_id must not end in {LEGACY_PREV_SUFFIX!r} (the previous release keeps a "
            f"stream's retry state there); got {stream_id!r}"
        )
    return stream_id


def session_key(namespace: str, session_id: str) -> str:
    return f"{namespace}:{SESSION_PREFIX}:{{{session_id}}}"


def history_key(namespace: str, session_id: str) -> str:
    return f"{namespace}:{SESSION_PREFIX}:{{{session_id}}}:{HISTORY_SUFFIX}"


def decoder_state_key(namespace: str, stream_id: str) -> str:
    return f"{namespace}:{DECODER_PREFIX}:{{{stream_id}}}"


def quota_calls_key(namespace: str, tenant: str) -> str:
    return f"{namespace}:{QUOTA_PREFIX}:{{{tenant}}}:calls"


def quota_starts_key(namespace: str, tenant: str) -> str:
    return f"{namespace}:{QUOTA_PREFIX}:{{{tenant}}}:starts"
