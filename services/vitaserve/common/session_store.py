"""Redis-backed session state: each call's conversation, so any gateway replica can continue a call.
(Each audio stream's decoder state has its own store: decoder/state_store.py.)

Writes are Lua scripts (session_scripts.py) fenced by the turn counter, the owner and a fencing
token; a loser gets StaleWriteError and nothing of its write lands. Transient Redis failures are
retried by the shared policy of redis_retry.py, bounded in attempts and total time; only reads and
writes that are idempotent or fenced are retried (every script recognises its own replay), and
when the budget is spent the caller gets StoreUnavailable (gRPC UNAVAILABLE).

A full Redis (maxmemory, noeviction) refuses writes: StoreFull (gRPC RESOURCE_EXHAUSTED). New
sessions are refused before that, once used_memory passes a fraction of maxmemory
(keys.NEW_SESSION_MEMORY_FRACTION), so that the calls already running keep room for their turns.

Build the client with `connect_redis()` (no client-side retries, short socket timeouts): the
stores own the retry policy.
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from vitaserve.common import keys
from vitaserve.common.redis_retry import OnRetry, RedisRetry, check_store, text
from vitaserve.common.session_scripts import SESSION_SCRIPTS, session_script
from vitaserve.common.session_types import (
    RecordTooLarge,
    SessionConfig,
    SessionEnded,
    SessionError,
    SessionInputError,
    SessionNotFound,
    SessionRecord,
    StaleWriteError,
    StoreFull,
    StoreUnavailable,
    TurnRecord,
    UnknownSchema,
    record_from_redis,
)

log = structlog.get_logger(__name__)


class SessionExists(SessionError):
    """create() with a chosen session id that is already taken."""


__all__ = [
    "SessionStore", "connect_redis", "SessionConfig", "SessionRecord", "TurnRecord",
    "SessionError", "SessionNotFound", "SessionEnded", "StaleWriteError", "StoreUnavailable",
    "StoreFull", "SessionInputError", "RecordTooLarge", "UnknownSchema", "SessionExists",
]


def connect_redis(url: str = "redis://localhost:6379/0", *, timeout_s: float = 2.0,
                  max_connections: int | None = None, tls=None) -> aioredis.Redis:
    """A client fit for SessionStore and DecoderStateStore: bytes replies, short timeouts, no retries of its own.

    `redis://` / `rediss://` URLs name one server; `redis+sentinel://[:password@]h1:p1,h2:p2/service[/db]`
    names Sentinels, and the client follows the current master of `service` across failovers.
    `tls` (common.tls.ClientTls, rediss:// only): trust only its CA, check the server's host name,
    and present its certificate when it has one (Redis with tls-auth-clients yes). A rediss:// URL
    without it is still verified, against the system's CAs.
    """
    options = dict(decode_responses=False, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                   retry=Retry(NoBackoff(), 0))
    if tls is not None:
        if not url.startswith("rediss://"):
            raise ValueError("Redis TLS settings need a rediss:// URL")
        options.update(ssl_ca_certs=tls.ca_file, ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file,
                       ssl_cert_reqs="required", ssl_check_hostname=True)
    if url.startswith("redis+sentinel://"):
        return _sentinel_master(url, options)
    return aioredis.Redis.from_url(url, max_connections=max_connections, **options)


def _sentinel_master(url: str, options: dict) -> aioredis.Redis:
    from urllib.parse import unquote

    from redis.asyncio.sentinel import Sentinel

    rest = url[len("redis+sentinel://"):]
    password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[-1]) or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError("a sentinel URL looks like redis+sentinel://[:password@]host:port[,host:port]/service[/db]")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        sentinels.append((host or item, int(port) if host else 26379))
    db = int(parts[1]) if len(parts) > 1 else 0
    sentinel = Sentinel(sentinels, socket_timeout=options["socket_timeout"])
    return sentinel.master_for(parts[0], password=password, db=db, **options)


def _word(reply: list) -> str:
    return text(reply[0])


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SessionInputError(f"{name} must be a non-negative integer, got {v!r}")
    return v


class SessionStore:
    """The sessions of one namespace in one Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str = keys.DEFAULT_NAMESPACE,
        session_ttl_s: int = keys.SESSION_TTL_S,
        *,
        max_turns: int = keys.MAX_HISTORY_TURNS,
        max_turn_bytes: int = keys.MAX_TURN_BYTES,
        max_system_prompt_bytes: int = keys.MAX_SYSTEM_PROMPT_BYTES,
        retry_attempts: int = keys.RETRY_ATTEMPTS,
        retry_max_s: float = keys.RETRY_MAX_S,
        on_retry: OnRetry | None = None,
        new_session_memory_fraction: float = keys.NEW_SESSION_MEMORY_FRACTION,
        store_text: bool = True,
    ) -> None:
        """session_ttl_s is the retention of an idle session and its history (the gateway's
        --history-ttl-s); store_text False keeps no transcript text in the history (--no-store-text)."""
        self.namespace = check_store(redis, "SessionStore", namespace, session_ttl_s=session_ttl_s,
                                     max_turns=max_turns, max_turn_bytes=max_turn_bytes,
                                     max_system_prompt_bytes=max_system_prompt_bytes)
        self.retry = RedisRetry(retry_attempts, retry_max_s, on_retry)
        self.redis = redis
        self.session_ttl_ms = session_ttl_s * 1000
        self.max_turns = max_turns
        self.max_turn_bytes = max_turn_bytes
        self.max_system_prompt_bytes = max_system_prompt_bytes
        if not 0 < new_session_memory_fraction <= 1:
            raise SessionInputError(
                f"new_session_memory_fraction must be in (0, 1], got {new_session_memory_fraction!r}")
        self.new_session_memory_fraction = new_session_memory_fraction
        self.store_text = store_text
        self._memory: tuple[float, int, int] | None = None  # (read at, used_memory, maxmemory)
        # Registered once; redis-py loads a script again by itself after NOSCRIPT (Redis restart).
        self._scripts = {n: redis.register_script(session_script(n)) for n in SESSION_SCRIPTS}

    # ---- plumbing -------------------------------------------------------------------------

    async def _retrying(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return await self.retry.run(what, fn)

    async def _run(self, what: str, script: str, keys_: list[str], args: list[Any]) -> list:
        s = self._scripts[script]
        return await self._retrying(what, lambda: s(keys=keys_, args=args))

    async def _memory_use(self) -> tuple[int, int]:
        """(used_memory, maxmemory) from INFO memory, read at most once per keys.MEMORY_CHECK_S.
        maxmemory 0 means no limit, and so does a Redis that refuses INFO (an ACL, a managed
        service): then only Redis's own OOM refusals stop new sessions."""
        now = time.monotonic()
        if self._memory is None or now - self._memory[0] >= keys.MEMORY_CHECK_S:
            try:
                info = await self.redis.info("memory")  # retried with the create that asks
                used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
            except ResponseError as e:
                if self._memory is None:
                    log.warning("INFO memory refused: new sessions are not held back before Redis is full",
                                error=str(e))
                used, limit = 0, 0
            self._memory = (now, used, limit)
        return self._memory[1], self._memory[2]

    async def _check_room_for_new_session(self) -> None:
        used, limit = await self._memory_use()
        if limit and used > self.new_session_memory_fraction * limit:
            raise StoreFull(
                f"no room for a new session: Redis uses {used} of its {limit} bytes (maxmemory), over "
                f"the {self.new_session_memory_fraction:.0%} kept for calls already running"
            )

    def _keys(self, session_id: str) -> list[str]:
        try:
            keys.check_session_id(session_id)
        except keys.InvalidKeyPart as e:
            raise SessionInputError(str(e)) from None
        return [keys.session_key(self.namespace, session_id),
                keys.history_key(self.namespace, session_id)]

    @staticmethod
    def _owner(owner: str) -> str:
        if not isinstance(owner, str) or not owner or len(owner) > 256:
            raise SessionInputError(
                f"owner must be a non-empty string of at most 256 characters, got {owner!r}"
            )
        return owner

    @staticmethod
    def _fence(fence: int | None) -> str:
        if fence is None:
            return ""
        return str(_count("fence", fence))

    @staticmethod
    def _raise_for(reply: list, session_id: str, action: str) -> None:
        """Map a script's refusal to the store's errors; return on ok/done."""
        word = _word(reply)
        if word in ("ok", "done"):
            return
        if word == "missing":
            raise SessionNotFound(f"session {session_id} not found (unknown id, or expired)")
        if word == "ended":
            raise SessionEnded(f"session {session_id} has ended; cannot {action}")
        if word == "schema":
            raise UnknownSchema(
                f"cannot {action} on session {session_id}: it is stored in schema version "
                f"{text(reply[1])}, newer than this release reads ({keys.SESSION_SCHEMA})"
            )
        if word == "stale":
            what, value = text(reply[1]), text(reply[2])
            why = {
                "owner": f"the call is now owned by {value!r}" if value
                else "the session has no owner yet (claim it first)",
                "fence": f"the session was claimed again (fence is now {value})",
                "turn": f"the turn counter is {value}",
                "committed": f"turn {value} was already committed",
                "open": f"turn {value} is not committed yet",
                "last": f"the history's last turn is {value or 'none'}",
            }.get(what, f"{what} is {value}")
            raise StaleWriteError(f"cannot {action} on session {session_id}: {why}", what=what, value=value)
        raise SessionError(f"unexpected reply {reply!r} to {action} on session {session_id}")

    # ---- sessions -------------------------------------------------------------------------

    @staticmethod
    def _tenant(tenant: str) -> str:
        try:
            return keys.check_tenant(tenant)
        except keys.InvalidKeyPart as e:
            raise SessionInputError(str(e)) from None

    async def create(self, config: SessionConfig, owner: str = "", tenant: str = keys.ANONYMOUS_TENANT,
                     session_id: str = "") -> str:
        """Start a session of `tenant`; returns its id: 128 random bits from `secrets` (32 hex
        digits), so ids cannot be guessed. `owner` may be set now or by claim().
        `session_id`: an id the caller's protocol names instead (an AudioSocket stream's UUID);
        SessionExists if it is taken. StoreFull when Redis is near its memory limit (the rest is for
        the calls running)."""
        if not isinstance(config, SessionConfig):
            raise SessionInputError(f"config must be a SessionConfig, got {type(config).__name__}")
        if owner != "":
            self._owner(owner)
        n = len(config.system_prompt.encode())
        if n > self.max_system_prompt_bytes:
            raise RecordTooLarge(
                f"system prompt is {n} bytes, over the limit of {self.max_system_prompt_bytes}"
            )
        tenant = self._tenant(tenant)
        chosen = bool(session_id)
        session_id = session_id or secrets.token_hex(16)
        self._keys(session_id)  # a chosen id is checked like any other
        fields = ["mode", config.mode, "codec", config.codec, "sample_rate", config.sample_rate,
                  "system_prompt", config.system_prompt]
        script, args = self._scripts["create"], [uuid.uuid4().hex, self.session_ttl_ms, owner, tenant, *fields]

        async def attempt() -> list:  # one retry budget for the memory check and the write
            await self._check_room_for_new_session()
            return await script(keys=self._keys(session_id), args=args)

        reply = await self._retrying("create a session", attempt)
        if _word(reply) == "exists":  # a chosen id in use, or a collision of 128 random bits
            raise (SessionExists if chosen else SessionError)(f"session id {session_id} already exists")
        return session_id

    async def get(self, session_id: str) -> SessionRecord | None:
        """The session with its history, or None if unknown/expired. Does not refresh the TTL."""
        flat, history = await self._run("read a session", "read", self._keys(session_id), [])
        if not flat:
            return None
        return record_from_redis(session_id, dict(zip(flat[0::2], flat[1::2])), history)

    async def history(self, session_id: str) -> list[TurnRecord]:
        """The finished turns (at most max_turns, oldest first); SessionNotFound if unknown."""
        rec = await self.get(session_id)
        if rec is None:
            raise SessionNotFound(f"session {session_id} not found (unknown id, or expired)")
        return rec.history

    async def begin_turn(self, session_id: str, expected_turn: int, owner: str,
                         fence: int | None = None) -> int:
        """Start turn expected_turn + 1 and return its number. Fails with StaleWriteError if the
        counter moved (another writer began a turn) or another owner holds the call. A turn of the
        same owner left unfinished (status in_turn) is abandoned; its number is never reused."""
        args = [_count("expected_turn", expected_turn), self._owner(owner), self._fence(fence),
                uuid.uuid4().hex, self.session_ttl_ms]
        reply = await self._run("begin a turn", "begin_turn", self._keys(session_id), args)
        self._raise_for(reply, session_id, f"begin turn {expected_turn + 1}")
        return int(reply[1])

    async def commit_turn(self, session_id: str, turn: int, record: TurnRecord, owner: str,
                          fence: int | None = None) -> None:
        """Append the finished turn to the history (the oldest trimmed past max_turns). Only the
        owner of the turn in progress may commit it, once."""
        if not isinstance(record, TurnRecord):
            raise SessionInputError(f"record must be a TurnRecord, got {type(record).__name__}")
        if record.turn != turn:
            raise SessionInputError(
                f"record is for turn {record.turn}, but turn {turn!r} is being committed"
            )
        if not self.store_text and record.text:
            record = TurnRecord(turn=record.turn, user_audio=record.user_audio,
                                assistant_ids=record.assistant_ids, interrupted=record.interrupted)
        data = record.to_json()
        if len(data) > self.max_turn_bytes:
            raise RecordTooLarge(
                f"turn {turn} record is {len(data)} bytes, over the limit of {self.max_turn_bytes}"
            )
        args = [turn, self._owner(owner), self._fence(fence), uuid.uuid4().hex,
                self.session_ttl_ms, data, self.max_turns]
        reply = await self._run("commit a turn", "commit_turn", self._keys(session_id), args)
        self._raise_for(reply, session_id, f"commit turn {turn}")

    async def cut_turn(self, session_id: str, record: TurnRecord, owner: str, fence: int | None = None) -> None:
        """Replace the session's last turn, already committed, by the part of its answer the caller
        heard (a barge-in on an answer that finished generating but was still playing): `record`
        has that turn's number and user audio, a prefix of its assistant ids, their text, and
        interrupted=True. Only the owner may cut, only the last turn (StaleWriteError once a later
        turn began), and only shorter (SessionInputError for ids that are not a prefix of the
        stored ones). A retry after a lost reply is recognised by its op id."""
        if not isinstance(record, TurnRecord):
            raise SessionInputError(f"record must be a TurnRecord, got {type(record).__name__}")
        if not record.interrupted:
            raise SessionInputError(f"a cut of turn {record.turn} must be marked interrupted")
        if not self.store_text and record.text:
            record = TurnRecord(turn=record.turn, user_audio=record.user_audio,
                                assistant_ids=record.assistant_ids, interrupted=True)
        data = record.to_json()
        if len(data) > self.max_turn_bytes:
            raise RecordTooLarge(
                f"turn {record.turn} record is {len(data)} bytes, over the limit of {self.max_turn_bytes}"
            )
        args = [record.turn, self._owner(owner), self._fence(fence), uuid.uuid4().hex, self.session_ttl_ms, data]
        reply = await self._run("cut a turn", "cut_turn", self._keys(session_id), args)
        if _word(reply) == "grows":
            raise SessionInputError(f"cannot cut turn {record.turn} of session {session_id}: {text(reply[1])} "
                                    "(a cut keeps a prefix of the stored answer)")
        self._raise_for(reply, session_id, f"cut turn {record.turn}")

    async def abort_turn(self, session_id: str, turn: int, owner: str, fence: int | None = None) -> int:
        """Give back the number of a turn that failed with nothing committed (the counter returns
        to turn - 1, status active); returns the counter. StaleWriteError if the turn is no longer
        the one in progress or another owner holds the call."""
        args = [_count("turn", turn), self._owner(owner), self._fence(fence), uuid.uuid4().hex,
                self.session_ttl_ms]
        reply = await self._run("abort a turn", "abort_turn", self._keys(session_id), args)
        self._raise_for(reply, session_id, f"abort turn {turn}")
        return int(reply[1])

    async def claim(self, session_id: str, owner: str, tenant: str = keys.ANONYMOUS_TENANT) -> SessionRecord:
        """Take over the call (resume on another replica): the new owner, a bumped fence, and the
        session as it is now. The old owner's later writes fail with StaleWriteError; its
        unfinished turn is abandoned. Another tenant's session is SessionNotFound, with the message
        of an unknown id, and is left as it was."""
        args = [self._owner(owner), uuid.uuid4().hex, self.session_ttl_ms, self._tenant(tenant)]
        reply = await self._run("claim a session", "claim", self._keys(session_id), args)
        self._raise_for(reply, session_id, "claim it")
        flat = reply[2]
        fields = dict(zip(flat[0::2], flat[1::2]))
        return record_from_redis(session_id, fields, reply[3])

    async def end(self, session_id: str, owner: str | None = None,
                  fence: int | None = None, erase: bool = False) -> None:
        """Mark the call ended; it expires ENDED_SESSION_TTL_S later (until then a late resume gets
        SessionEnded, not NotFound). With `owner`, only that owner may end it. Idempotent.
        `erase`: the history and the system prompt are deleted now (the caller asked; its audio
        token ids are personal data), not when the tombstone expires."""
        who = "" if owner is None else self._owner(owner)
        args = [who, self._fence(fence), keys.ENDED_SESSION_TTL_S * 1000, "1" if erase else "0"]
        reply = await self._run("end a session", "end", self._keys(session_id), args)
        self._raise_for(reply, session_id, "end it")

    async def touch(self, session_id: str) -> None:
        """Refresh the TTL of a connected but idle call (on hold, a long silence)."""
        reply = await self._run("refresh a session", "touch", self._keys(session_id),
                                [self.session_ttl_ms])
        self._raise_for(reply, session_id, "refresh it")
