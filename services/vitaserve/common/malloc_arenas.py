"""Cap glibc's malloc arenas in a service process, so its resident memory levels off.

glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and memory
freed in one arena is not reused by another: a service whose thread pools (asyncio.to_thread, a
batcher, torch's intra-op threads) allocate tensors of many sizes grows its RSS for minutes before it
levels off, which a soak reads as a leak. Two arenas is the setting servers commonly run with
(MALLOC_ARENA_MAX=2); it is applied with mallopt at start-up, before the threads exist, because the
environment variable is read only when the process starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # glibc's malloc.h


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """True when glibc took the cap; False where there is no glibc (musl, macOS): nothing to do."""
    if arenas < 1:
        raise ValueError(f"arenas must be >= 1, got {arenas}")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_ARENA_MAX, arenas) == 1
