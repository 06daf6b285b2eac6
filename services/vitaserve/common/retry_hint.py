"""A server's word that retrying a failed call on another replica cannot help.

The decoder's replicas share one Redis, and each already retries it within its own budget: when that
budget is spent, a gateway that retried the block on another replica would only multiply the wait
(4 attempts x the decoder's Redis budget) before the caller hears of the failure. The server says so
in the status's trailing metadata; the gateway's retry policy reads it.
"""

from __future__ import annotations

import grpc

NO_RETRY = ("vita-no-retry", "shared-dependency")


def says_no_retry(exc: BaseException) -> bool:
    if not isinstance(exc, grpc.aio.AioRpcError):
        return False
    return any(key == NO_RETRY[0] for key, _ in (exc.trailing_metadata() or ()))
