"""The reader-stall limit every adapter applies to its writes, as Converse does to its caller.

A platform that takes nothing for --max-reader-stall-s ends its call with DEADLINE_EXCEEDED; until
then the socket's write buffer and the call's Outbox hold the answer back (bounded memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc

from vitaserve.common import metrics
from vitaserve.gateway.convert import CallError


async def within_stall(write: Awaitable, stall_s: float, peer: str) -> None:
    """Await `write` (a send or a drain); CallError(DEADLINE_EXCEEDED) once it waited stall_s.
    `peer` names who failed to read, for the message ("the platform", "Asterisk", ...)."""
    try:
        await asyncio.wait_for(write, stall_s)
    except asyncio.TimeoutError:
        metrics.GATEWAY_CALL_LIMITS.labels("reader_stall").inc()
        raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{peer} read nothing for {stall_s:g} s") from None
