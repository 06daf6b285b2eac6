"""Each audio stream's decoder state in Redis, so any decoder replica can serve the stream's next block.

One hash per stream (keys.decoder_state_key) holds the state after the newest block and the state
before it: `seq`/`data` and `prev_seq`/`prev_data`, with `schema`. Block `seq` starts from the
state after block seq-1; a retried block whose first attempt already stored its state (the reply
was lost) starts from the previous state, so it is computed again identically and stores nothing.

One Lua script writes all four fields: the new state becomes current and the old current becomes
previous in one step, fenced by seq, so no reader, and no writer dying half way, ever sees a
current state without its matching previous one. Writes are idempotent: the same seq with the same
bytes again (a retry after a lost reply) answers "done".

Versions (keys.py has the table): this release writes schema 2. A version 1 hash (release 1: seq
and data only, the previous state under a second key "<stream_id>:prev") reads as a stream without
a previous state: its next block continues it and rewrites it as version 2, while a retry of its
newest block fails as "previous state is gone" (the :prev key is never read; its TTL removes it).
A release 1 replica writing a version 2 hash updates seq/data only; prev_seq then no longer equals
seq - 1, and a retry is refused the same way rather than served from a wrong state.

Serialising a state (torch + safetensors, up to megabytes) runs in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import redis.asyncio as aioredis

from vitaserve.common import keys
from vitaserve.common.redis_retry import RedisRetry, check_store, text
from vitaserve.common.session_types import (
    RecordTooLarge,
    SessionEnded,
    SessionError,
    SessionInputError,
    SessionNotFound,
    StaleWriteError,
    UnknownSchema,
    record_schema,
)
from vitaserve.decoder.stream_state import DecoderStreamState

if TYPE_CHECKING:
    from vitaserve.common.session_store import SessionStore

# KEYS[1] decoder state hash
# ARGV[1] seq   ARGV[2] data   ARGV[3] ttl ms   ARGV[4] schema written (the newest this code reads)
# returns {'ok'} | {'done'} (this seq with these bytes is already current: a retry)
#       | {'missing'} (seq > 0 but nothing stored) | {'stale', stored seq}
#       | {'schema', stored version} (written by a newer release: left alone)
PUT_STATE = """
local f = redis.call('HMGET', KEYS[1], 'schema', 'seq', 'data')
if f[1] and tonumber(f[1]) and tonumber(f[1]) > tonumber(ARGV[4]) then return {'schema', f[1]} end
local seq = tonumber(ARGV[1])
if not f[2] then
  if seq ~= 0 then return {'missing'} end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'schema', ARGV[4], 'seq', seq, 'data', ARGV[2])
else
  if seq == tonumber(f[2]) and f[3] == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {'done'}
  end
  if seq ~= tonumber(f[2]) + 1 then return {'stale', f[2]} end
  redis.call('HSET', KEYS[1], 'schema', ARGV[4], 'seq', seq, 'data', ARGV[2],
             'prev_seq', f[2], 'prev_data', f[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'ok'}
"""

_FIELDS = ("schema", "seq", "data", "prev_seq", "prev_data")


class StoredState(NamedTuple):
    """A stream's hash as read back: the state after block `seq` and, if kept, the one before it."""

    seq: int
    data: bytes
    prev_seq: int | None
    prev_data: bytes | None
    schema: int


@dataclass(frozen=True)
class BlockStart:
    """What block `seq` starts from. `state` None: a new stream (the decoder starts one).
    `retry`: the block's state is already stored (a lost reply): compute it again, store nothing."""

    state: DecoderStreamState | None
    retry: bool


class Saved(NamedTuple):
    size: int  # bytes of the serialised state
    written: bool  # False: another attempt at this same block had stored it (the same state)


class DecoderStateStore:
    """The decoder stream states of one namespace in one Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str = keys.DEFAULT_NAMESPACE,
        ttl_s: int = keys.DECODER_STATE_TTL_S,
        *,
        max_state_bytes: int = keys.MAX_DECODER_STATE_BYTES,
        retry: RedisRetry | None = None,
    ) -> None:
        self.namespace = check_store(redis, "DecoderStateStore", namespace, ttl_s=ttl_s,
                                     max_state_bytes=max_state_bytes)
        self.redis = redis
        self.ttl_ms = ttl_s * 1000
        self.max_state_bytes = max_state_bytes  # per state; the hash holds two
        self.retry = retry if retry is not None else RedisRetry()
        self._put = redis.register_script(PUT_STATE)

    @classmethod
    def beside(cls, sessions: "SessionStore", **kw) -> "DecoderStateStore":
        """The state store on the same Redis client, namespace and retry policy as `sessions`."""
        return cls(sessions.redis, sessions.namespace, retry=sessions.retry, **kw)

    def _key(self, stream_id: str) -> str:
        try:
            keys.check_stream_id(stream_id)
        except keys.InvalidKeyPart as e:
            raise SessionInputError(str(e)) from None
        return keys.decoder_state_key(self.namespace, stream_id)

    # ---- bytes --------------------------------------------------------------------------------

    async def put(self, stream_id: str, seq: int, data: bytes) -> None:
        """Store a stream's state after block `seq`, the current one becoming the previous: only
        if seq is the stored seq + 1, or 0 for a new stream. StaleWriteError (what "seq", value
        the stored seq) if another replica stored this or a later seq first; SessionNotFound if
        seq > 0 and nothing is stored (expired or deleted). The same seq and bytes again is a no-op."""
        key = self._key(stream_id)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise SessionInputError(f"seq must be a non-negative integer, got {seq!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SessionInputError(f"decoder state must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > self.max_state_bytes:
            raise RecordTooLarge(
                f"decoder state of stream {stream_id} is {len(data)} bytes, "
                f"over the limit of {self.max_state_bytes}"
            )
        args = [seq, data, self.ttl_ms, keys.DECODER_STATE_SCHEMA]
        reply = await self.retry.run("store a decoder state", lambda: self._put(keys=[key], args=args))
        word = text(reply[0])
        if word == "missing":
            raise SessionNotFound(
                f"decoder stream {stream_id} has no stored state (expired or deleted); "
                f"seq {seq} needs seq {seq - 1} stored first"
            )
        if word == "stale":
            held = text(reply[1])
            raise StaleWriteError(
                f"decoder stream {stream_id} holds seq {held}; cannot store seq {seq} "
                "(only the next seq, or 0 for a new stream)", what="seq", value=held,
            )
        if word == "schema":
            raise UnknownSchema(
                f"decoder stream {stream_id} is stored in schema version {text(reply[1])}, newer "
                f"than this release reads ({keys.DECODER_STATE_SCHEMA}); cannot store seq {seq}"
            )
        if word not in ("ok", "done"):
            raise SessionError(f"unexpected reply {reply!r} to storing decoder stream {stream_id}")

    async def get(self, stream_id: str) -> StoredState | None:
        """The stream's states, or None if none is stored (unknown, expired, deleted)."""
        key = self._key(stream_id)
        raw = await self.retry.run("read a decoder state", lambda: self.redis.hmget(key, list(_FIELDS)))
        schema, seq, data, prev_seq, prev_data = raw
        if seq is None or data is None:
            return None
        version = record_schema(f"decoder stream {stream_id}", schema, keys.DECODER_STATE_SCHEMA)
        try:
            has_prev = prev_seq is not None and prev_data is not None
            return StoredState(int(seq), bytes(data), int(prev_seq) if has_prev else None,
                               bytes(prev_data) if has_prev else None, version)
        except ValueError:
            raise SessionError(f"decoder stream {stream_id} is corrupt in Redis: seq {seq!r}, "
                               f"prev_seq {prev_seq!r}") from None

    async def delete(self, stream_id: str) -> None:
        """Forget the stream (idempotent)."""
        key = self._key(stream_id)
        await self.retry.run("delete a decoder state", lambda: self.redis.delete(key))

    # ---- states -------------------------------------------------------------------------------

    async def start_of(self, stream_id: str, seq: int) -> BlockStart:
        """The state block `seq` starts from, by the fencing rules: block 0 starts a stream (or
        retries its first block), block seq follows seq-1, and a block already stored is a retry
        served from the previous state. StaleWriteError when the stream is elsewhere,
        SessionNotFound when it is unknown, SessionEnded when it was finalized."""
        stored = await self.get(stream_id)
        if seq == 0:
            if stored is None:
                return BlockStart(None, retry=False)
            if stored.seq == 0:
                return BlockStart(None, retry=True)
            raise StaleWriteError(f"stream {stream_id} already has blocks up to {stored.seq}; "
                                  "block 0 cannot restart it")
        if stored is None:
            raise SessionNotFound(f"stream {stream_id} is unknown or expired (no state for block {seq - 1})")
        data, retry = stored.data, False
        if stored.seq == seq:
            if stored.prev_seq != seq - 1:
                raise StaleWriteError(f"stream {stream_id} already decoded block {seq} and its previous "
                                      "state is gone; the block cannot be recomputed")
            data, retry = stored.prev_data, True
        elif stored.seq != seq - 1:
            raise StaleWriteError(f"stream {stream_id} is at block {stored.seq}; "
                                  f"block {seq} cannot follow it")
        state = await asyncio.to_thread(DecoderStreamState.from_bytes, data)
        if state.finalized:
            raise SessionEnded(f"stream {stream_id} was finalized at block {seq - 1}; start a new stream")
        return BlockStart(state, retry)

    async def save(self, stream_id: str, seq: int, state: DecoderStreamState) -> Saved:
        """Store the state after block `seq`. Another attempt at this same block (a client retry
        after a deadline, on another replica) may have stored it while this one computed: the
        same state, so that is not an error (written False)."""
        data = await asyncio.to_thread(state.to_bytes)
        try:
            await self.put(stream_id, seq, data)
        except StaleWriteError as exc:
            if exc.value != str(seq):
                raise
            return Saved(len(data), written=False)
        return Saved(len(data), written=True)
