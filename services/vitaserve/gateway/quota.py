"""Per-tenant quotas shared by every gateway replica through Redis: concurrent calls and new calls
per minute.

Concurrent calls are leases, not counters: each call adds a member to the tenant's sorted set
(keys.quota_calls_key) scored with its expiry on the Redis clock, the live call pushes that expiry
forward every lease_s / 3, and an ending call removes it. A gateway killed with SIGKILL removes
nothing, and its leases simply lapse lease_s later, so a tenant never loses slots for good. New
calls per minute are a sliding log (keys.quota_starts_key): a call is admitted when fewer than the
limit started in the last 60 s, and the refusal says exactly when the oldest of them leaves the
window. Both checks and both writes are one Lua script, so replicas never overshoot a limit
together. A refusal is QuotaExceeded with the seconds to wait (google.rpc.RetryInfo at the edge).

Limits: the defaults (--tenant-max-calls, --tenant-calls-per-minute; 0 = unlimited), overridden
per tenant by the "tenants" section of the API keys file, then by --tenant-limits-file:
  {"tenants": {"acme": {"max_calls": 20, "calls_per_minute": 600}}}
A tenant with no limit at all costs no Redis round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Callable

import redis.asyncio as aioredis
import structlog

from vitaserve.common import keys
from vitaserve.common.redis_retry import RedisRetry

log = structlog.get_logger(__name__)

WINDOW_S = 60  # "new calls per minute"
# When a concurrent-call slot frees is up to the calls holding them, which nobody can predict; a
# second is short next to a call and long enough not to make a refused client spin.
CONCURRENT_RETRY_S = 1.0
LEASE_S = 30.0  # default lease: a killed gateway's calls stop counting this long after it died

# KEYS[1] the tenant's leases (zset: lease id -> expiry ms)   KEYS[2] its starts (zset: id -> start ms)
# ARGV[1] lease id   ARGV[2] lease ms   ARGV[3] max calls (0 = no limit)   ARGV[4] starts per window
# (0 = no limit)   ARGV[5] window ms
# returns {'ok'} | {'rate', ms to wait} | {'calls', ms to wait}
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, lease, max_calls, rate, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('ZSCORE', KEYS[1], id) or redis.call('ZSCORE', KEYS[2], id) then
  return {'ok'}  -- a retry of this acquire whose reply was lost
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if rate > 0 then
  local started = redis.call('ZCARD', KEYS[2])
  if started >= rate then  -- wait until enough of them leave the window for one more
    local oldest = redis.call('ZRANGE', KEYS[2], started - rate, started - rate, 'WITHSCORES')
    return {'rate', tonumber(oldest[2]) + window - now}
  end
end
if max_calls > 0 and redis.call('ZCARD', KEYS[1]) >= max_calls then
  return {'calls', 0}
end
if max_calls > 0 then
  redis.call('ZADD', KEYS[1], now + lease, id)
  redis.call('PEXPIRE', KEYS[1], lease)
end
if rate > 0 then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('PEXPIRE', KEYS[2], window)
end
return {'ok'}
"""

# KEYS[1] the tenant's leases   ARGV[1] lease id   ARGV[2] lease ms
# The live call's lease, pushed lease ms past now (added back if it lapsed while Redis was away:
# the call is running, so it counts). The key lives as long as its newest lease.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class QuotaExceeded(Exception):
    """The tenant is at a limit: RESOURCE_EXHAUSTED, retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class TenantLimits:
    max_calls: int = 0         # concurrent calls (Converse, Synthesize, Transcribe); 0 = unlimited
    calls_per_minute: int = 0  # new calls in any 60 s; 0 = unlimited

    def __post_init__(self) -> None:
        for name in ("max_calls", "calls_per_minute"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0 (0 = unlimited), got {value!r}")

    @property
    def unlimited(self) -> bool:
        return self.max_calls == 0 and self.calls_per_minute == 0


def parse_tenant_limits(section: Any, where: str) -> dict[str, TenantLimits]:
    """{"acme": {"max_calls": 20, "calls_per_minute": 600}} -> TenantLimits by tenant; ValueError
    naming the tenant and the field."""
    if not isinstance(section, dict):
        raise ValueError(f'{where}: "tenants" must be an object of tenant name -> limits')
    limits = {}
    for tenant, item in section.items():
        try:
            keys.check_tenant(tenant)
            if not isinstance(item, dict) or set(item) - {"max_calls", "calls_per_minute"}:
                raise ValueError('limits are an object with "max_calls" and/or "calls_per_minute"')
            limits[tenant] = TenantLimits(**item)
        except ValueError as exc:
            raise ValueError(f"{where}, tenant {tenant!r}: {exc}") from None
    return limits


def load_tenant_limits_file(data: bytes) -> dict[str, TenantLimits]:
    """The --tenant-limits-file: {"tenants": {...}}."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"tenant limits file is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError('tenant limits file must be an object with a "tenants" section')
    return parse_tenant_limits(doc.get("tenants", {}), "tenant limits file")


class Quotas:
    """The quotas of one namespace in one Redis. `overrides()` returns the per-tenant limits now in
    force (files reload), `defaults` applies to every other tenant."""

    def __init__(self, redis: aioredis.Redis, defaults: TenantLimits,
                 overrides: Callable[[], dict[str, TenantLimits]] = dict, *,
                 namespace: str = keys.DEFAULT_NAMESPACE, lease_s: float = LEASE_S,
                 retry: RedisRetry | None = None):
        if not 0.1 <= lease_s <= 3600:
            raise ValueError(f"lease_s must be in [0.1, 3600], got {lease_s}")
        self.redis, self.defaults, self.overrides = redis, defaults, overrides
        self.namespace = keys.check_namespace(namespace)
        self.lease_ms = int(lease_s * 1000)
        self.retry = retry or RedisRetry(keys.RETRY_ATTEMPTS, keys.RETRY_MAX_S)
        self._acquire = redis.register_script(ACQUIRE)
        self._refresh = redis.register_script(REFRESH)

    def limits(self, tenant: str) -> TenantLimits:
        return self.overrides().get(tenant, self.defaults)

    @contextlib.asynccontextmanager
    async def call(self, tenant: str) -> AsyncIterator[None]:
        """Hold one of the tenant's call slots for the block's duration (QuotaExceeded if none is
        free, StoreUnavailable if Redis cannot say). The lease is refreshed while the block runs."""
        limits = self.limits(tenant)
        if limits.unlimited:
            yield
            return
        lease_id = uuid.uuid4().hex
        calls_key = keys.quota_calls_key(self.namespace, tenant)
        starts_key = keys.quota_starts_key(self.namespace, tenant)
        reply = await self.retry.run("take a quota slot", lambda: self._acquire(
            keys=[calls_key, starts_key],
            args=[lease_id, self.lease_ms, limits.max_calls, limits.calls_per_minute, WINDOW_S * 1000]))
        word = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if word == "rate":
            wait_s = max(int(reply[1]), 0) / 1000
            raise QuotaExceeded(f"tenant {tenant!r} is at its limit of {limits.calls_per_minute} new calls per "
                                f"minute: retry in {wait_s:.1f} s", wait_s)
        if word == "calls":
            raise QuotaExceeded(f"tenant {tenant!r} is at its limit of {limits.max_calls} calls at once: retry "
                                "when one ends", CONCURRENT_RETRY_S)
        if limits.max_calls == 0:  # only a rate: nothing to hold
            yield
            return
        refresher = asyncio.ensure_future(self._keep(calls_key, lease_id))
        try:
            yield
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)
            try:  # one attempt: if it fails the lease lapses by itself within lease_s
                await self.redis.zrem(calls_key, lease_id)
            except Exception as exc:
                log.warning("quota lease not released: it lapses by itself", error=repr(exc))

    async def _keep(self, calls_key: str, lease_id: str) -> None:
        """Push the lease's expiry forward every lease / 3: two refreshes may fail before it lapses."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self._refresh(keys=[calls_key], args=[lease_id, self.lease_ms])
            except Exception as exc:
                log.warning("quota lease not refreshed", error=repr(exc))
