"""The retry policy of the Redis stores (sessions, decoder stream states), written once.

Transient Redis failures are retried with tenacity, bounded in attempts AND total time with an
exponential backoff; when the budget is spent the caller gets StoreUnavailable (gRPC UNAVAILABLE).
A write refused because Redis is full (OOM: maxmemory reached, noeviction) is not retried: it
would not pass within the budget; the caller gets StoreFull (gRPC RESOURCE_EXHAUSTED). Nothing of
such a write lands: Redis refuses a script's first write, and every script writes only after its
checks, so the script ends before it has changed anything.
Only reads and writes that are idempotent or fenced go through here: every Lua script of both
stores recognises its own replay, so a retry after a lost reply is never a conflicting writer.

The policy lives here and not in the client: build the client with
`session_store.connect_redis()` (no client-side retries, short socket timeouts). redis-py's default
client retries 10 times with backoff by itself, which multiplies the attempts and the time to fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from vitaserve.common import keys
from vitaserve.common.session_types import SessionInputError, StoreFull, StoreUnavailable

# Transient: the connection failed or timed out (includes BusyLoadingError while Redis loads),
# a replica became read-only during a failover, a cluster slot is migrating.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError)

OnRetry = Callable[[str, int, BaseException], None]  # (what, attempt number, exception)


@dataclass(frozen=True)
class RedisRetry:
    """How often and how long a store call is retried; `on_retry` sees each failed attempt."""

    attempts: int = keys.RETRY_ATTEMPTS
    max_s: float = keys.RETRY_MAX_S
    on_retry: OnRetry | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise SessionInputError(f"retry_attempts must be a positive integer, got {self.attempts!r}")
        if not self.max_s > 0:
            raise SessionInputError(f"retry_max_s must be > 0, got {self.max_s!r}")

    async def run(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run fn, retrying transient Redis failures; StoreUnavailable once the budget is spent,
        StoreFull at once when Redis refuses a write for want of memory.
        `what` completes "Redis unavailable while trying to ..." and labels the retry metric."""

        def before_sleep(state: RetryCallState) -> None:
            if self.on_retry is not None and state.outcome is not None:
                self.on_retry(what, state.attempt_number, state.outcome.exception())

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.max_s),
            wait=wait_exponential(multiplier=keys.RETRY_BACKOFF_S, max=keys.RETRY_BACKOFF_CAP_S),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await fn()
        except OutOfMemoryError as e:
            raise StoreFull(f"Redis is full (maxmemory reached) while trying to {what}: {e}") from e
        except TRANSIENT as e:
            n = retrying.statistics.get("attempt_number", 1)
            raise StoreUnavailable(
                f"Redis unavailable while trying to {what} "
                f"({n} attempt{'s' if n != 1 else ''}): {type(e).__name__}: {e}"
            ) from e


def check_store(redis: aioredis.Redis, store: str, namespace: str, **positive: int) -> str:
    """What both stores check before use; returns the namespace. Replies must stay bytes (decoder
    states and turn JSON are compared and moved as raw bytes), every size and TTL is a positive
    integer, and the namespace is one keys.py accepts."""
    if redis.get_connection_kwargs().get("decode_responses"):
        raise SessionInputError(
            f"{store} needs a Redis client with decode_responses=False "
            "(decoder states are raw bytes); use connect_redis()"
        )
    for name, v in positive.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SessionInputError(f"{name} must be a positive integer, got {v!r}")
    try:
        return keys.check_namespace(namespace)
    except keys.InvalidKeyPart as e:
        raise SessionInputError(str(e)) from None


def text(v: bytes | str | int) -> str:
    """A script reply's element as text (replies are bytes on a bytes client)."""
    return v.decode() if isinstance(v, bytes) else str(v)
