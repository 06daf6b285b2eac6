"""The values a session holds in Redis, their validation and their wire form; the store's errors.

History encoding: one compact JSON string per finished turn in a Redis list. Why JSON in a list:
* a turn is appended with RPUSH and the oldest trimmed with LTRIM, both O(1)-ish and inside the
  same Lua script, so the history never has to be read back and rewritten to add a turn;
* JSON is in the standard library and readable in `redis-cli LRANGE` when debugging a call;
* compactness: ids are < 2**18, so "123456," is <= 7 bytes per id vs 3-5 for msgpack: within 2x,
  not worth a dependency; separators=(",", ":") drops the padding.

Versions (keys.py has the table): a turn is written with "v": 2 and read with or without it; the
session hash likewise with a `schema` field. A version newer than this code fails with UnknownSchema.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

from vitaserve.common import keys

STATUSES = ("active", "in_turn", "ended")
MAX_TOKEN_ID = 2**31 - 1  # ids travel as int32 elsewhere (Triton tensors, decoder state)
_TURN_FIELDS = ("turn", "user_audio", "assistant_ids", "text", "interrupted")


class SessionError(Exception):
    """Base of every error the session store raises."""


class SessionNotFound(SessionError):
    """The session (or decoder stream) id is unknown, or its keys expired."""


class SessionEnded(SessionError):
    """The call was ended; its session takes no more writes."""


class StaleWriteError(SessionError):
    """Another writer got there first (newer owner after a resume, or a concurrent turn).
    `what` names the check that failed (owner, fence, turn, committed) and `value` what it found."""

    def __init__(self, message: str, what: str = "", value: str = ""):
        super().__init__(message)
        self.what, self.value = what, value


class StoreUnavailable(SessionError):
    """Redis could not be reached within the retry budget: map to gRPC UNAVAILABLE."""


class StoreFull(StoreUnavailable):
    """Redis is at (or, for a new session, near) its memory limit: map to gRPC RESOURCE_EXHAUSTED.
    A StoreUnavailable, so whatever copes with an unreachable store copes with a full one."""


class UnknownSchema(SessionError):
    """A record written by a newer release, in a version this code cannot read."""


class SessionInputError(SessionError, ValueError):
    """An argument the store cannot accept (malformed id, wrong type, bad value)."""


class RecordTooLarge(SessionInputError):
    """One turn record (or decoder state, or system prompt) over its configured byte limit."""


def record_schema(what: str, raw: Any, newest: int) -> int:
    """The version of a stored record: absent (None) is version 1, the release before versioning.
    UnknownSchema names a version this code does not read; SessionError a version that is no number."""
    if raw is None:
        return keys.FIRST_SCHEMA
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if isinstance(text, str) and text.isascii() and text.isdigit():
        version = int(text)
    elif isinstance(text, int) and not isinstance(text, bool):
        version = text
    else:
        raise SessionError(f"{what} is corrupt in Redis: schema version {raw!r} is not a number")
    if not keys.FIRST_SCHEMA <= version <= newest:
        raise UnknownSchema(
            f"{what} is stored in schema version {version}; this release reads versions "
            f"{keys.FIRST_SCHEMA} to {newest} (was it written by a newer release?)"
        )
    return version


def _short_str(name: str, value: Any, max_len: int = 64) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise SessionInputError(
            f"{name} must be a non-empty string of at most {max_len} characters, got {value!r}"
        )
    return value


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise SessionInputError(f"{name} must be an integer, got a bool")
    try:
        v = operator.index(value)  # ints and numpy integers; floats and strings are refused
    except TypeError:
        raise SessionInputError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None
    if not lo <= v <= hi:
        raise SessionInputError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _ids(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise SessionInputError(f"{name} must be a list of token ids, got {type(values).__name__}")
    return [_int(f"{name}[{i}]", v, 0, MAX_TOKEN_ID) for i, v in enumerate(values)]


@dataclass(frozen=True)
class SessionConfig:
    """What the caller chose at call setup; fixed for the life of the session."""

    mode: str  # inference mode name (vanilla, balance, boost, ...)
    codec: str  # caller codec (pcm16, mulaw, alaw)
    sample_rate: int
    system_prompt: str = ""

    def __post_init__(self) -> None:
        _short_str("mode", self.mode)
        _short_str("codec", self.codec)
        object.__setattr__(self, "sample_rate", _int("sample_rate", self.sample_rate, 1, 1_000_000))
        if not isinstance(self.system_prompt, str):
            raise SessionInputError(
                f"system_prompt must be a string, got {type(self.system_prompt).__name__}"
            )


@dataclass
class TurnRecord:
    """One finished turn. assistant_ids are the generated ids actually SENT to the caller (barge-in
    cuts the answer; the history must hold what the caller heard, not what was generated)."""

    turn: int
    user_audio: list[int] = field(default_factory=list)  # audio token ids of the caller's speech
    assistant_ids: list[int] = field(default_factory=list)
    text: str = ""
    interrupted: bool = False

    def __post_init__(self) -> None:
        self.turn = _int("turn", self.turn, 1, MAX_TOKEN_ID)
        self.user_audio = _ids("user_audio", self.user_audio)
        self.assistant_ids = _ids("assistant_ids", self.assistant_ids)
        if not isinstance(self.text, str):
            raise SessionInputError(f"text must be a string, got {type(self.text).__name__}")
        if not isinstance(self.interrupted, bool):
            raise SessionInputError(
                f"interrupted must be a bool, got {type(self.interrupted).__name__}"
            )

    def to_json(self) -> bytes:
        obj = {"v": keys.SESSION_SCHEMA, **{k: getattr(self, k) for k in _TURN_FIELDS}}
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "TurnRecord":
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise SessionError(f"stored turn record is corrupt ({e}): {raw[:80]!r}") from None
        record_schema("stored turn record", obj.get("v"), keys.SESSION_SCHEMA)
        try:  # versions 1 and 2 have the same fields
            return cls(**{k: obj[k] for k in _TURN_FIELDS})
        except (ValueError, KeyError, TypeError) as e:
            raise SessionError(f"stored turn record is corrupt ({e}): {raw[:80]!r}") from None


@dataclass
class SessionRecord:
    """A session as read back: config, turn state, ownership and the (bounded) history."""

    session_id: str
    config: SessionConfig
    created_at: float  # Redis server clock, unix seconds: one clock for all replicas
    updated_at: float
    turn: int  # turns begun so far; an abandoned turn's number is never reused
    status: str  # "active" | "in_turn" | "ended"
    owner: str  # the holder (gateway replica + connection) allowed to write
    fence: int  # bumped by every claim: a fencing token for writers that pass it
    history: list[TurnRecord] = field(default_factory=list)
    tenant: str = keys.ANONYMOUS_TENANT  # whose session it is: only this tenant may resume it


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def record_from_redis(session_id: str, fields: dict, history: list) -> SessionRecord:
    """Build a SessionRecord from HGETALL and LRANGE replies (bytes keys and values)."""
    f = {_text(k): _text(v) for k, v in fields.items()}
    # Versions 1 (no schema field) and 2 have the same fields; a newer one is refused whole.
    record_schema(f"session {session_id}", f.get("schema"), keys.SESSION_SCHEMA)
    try:
        rec = SessionRecord(
            session_id=session_id,
            config=SessionConfig(
                mode=f["mode"], codec=f["codec"], sample_rate=int(f["sample_rate"]),
                system_prompt=f.get("system_prompt", ""),
            ),
            created_at=float(f["created_at"]),
            updated_at=float(f["updated_at"]),
            turn=int(f["turn"]),
            status=f["status"],
            owner=f.get("owner", ""),
            fence=int(f["fence"]),
            history=[TurnRecord.from_json(raw) for raw in history],
            tenant=f.get("tenant", keys.ANONYMOUS_TENANT),
        )
    except (KeyError, ValueError) as e:  # SessionInputError too: a stored config no longer valid
        raise SessionError(
            f"session {session_id} is corrupt in Redis: missing or bad field {e}"
        ) from None
    if rec.status not in STATUSES or not math.isfinite(rec.updated_at):
        raise SessionError(f"session {session_id} is corrupt in Redis: status {rec.status!r}")
    return rec
