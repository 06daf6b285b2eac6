"""What a run leaves in Redis: keys of the deployment's namespace by kind (common/keys.py layout), and
for those left after the calls, their TTLs and the state of their sessions.

A soak must end with Redis back where it started, or, where a key outlives its call on purpose
(an ended session stays until its TTL so that a late resume hears SessionEnded), with every such
key bounded by a TTL: this module gives the figures that tell which.
"""

from __future__ import annotations

from collections import Counter

from vitaserve.common import keys

KINDS = ("session", "history", "decoder", "other")


def kind_of(key: str, namespace: str = keys.DEFAULT_NAMESPACE) -> str:
    if key.startswith(f"{namespace}:{keys.SESSION_PREFIX}:"):
        return "history" if key.endswith(f":{keys.HISTORY_SUFFIX}") else "session"
    if key.startswith(f"{namespace}:{keys.DECODER_PREFIX}:"):
        return "decoder"
    return "other"


def namespace_keys(redis, namespace: str = keys.DEFAULT_NAMESPACE) -> list[str]:
    """Every key of the namespace (SCAN, never KEYS: it does not block a live Redis)."""
    return sorted(k.decode() if isinstance(k, bytes) else k
                  for k in redis.scan_iter(match=f"{namespace}:*", count=1000))


def count_by_kind(names: list[str], namespace: str = keys.DEFAULT_NAMESPACE) -> dict[str, int]:
    counts = Counter(kind_of(k, namespace) for k in names)
    return {**{kind: counts.get(kind, 0) for kind in KINDS}, "total": len(names)}


def leftovers(redis, before: list[str], after: list[str], namespace: str = keys.DEFAULT_NAMESPACE) -> dict:
    """The keys `after` has and `before` had not: by kind, the longest remaining TTL of each kind (s),
    how many have none (they would stay for ever), and the sessions among them by status (active /
    in_turn / ended)."""
    new = sorted(set(after) - set(before))
    ttls = [redis.ttl(k) for k in new]
    longest: dict[str, int] = {}
    for k, ttl in zip(new, ttls):
        if ttl >= 0:
            longest[kind_of(k, namespace)] = max(ttl, longest.get(kind_of(k, namespace), 0))
    statuses = Counter()
    for k in new:
        if kind_of(k, namespace) == "session":
            status = redis.hget(k, "status")
            statuses[(status.decode() if isinstance(status, bytes) else status) or "?"] += 1
    return {"keys": count_by_kind(new, namespace),
            "without_ttl": sum(t == -1 for t in ttls),
            "max_ttl_s": longest,
            "sessions_by_status": dict(statuses)}
