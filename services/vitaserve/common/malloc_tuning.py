"""Tune glibc malloc in a service process so that its resident memory levels off under load.

Two glibc behaviours make a PyTorch CPU service's RSS creep for many minutes, which a soak reads as a
leak. (1) Each thread that allocates concurrently gets its own arena (up to 8 per core), and memory
freed in one arena is not reused by another; the services' thread pools (asyncio.to_thread, the
batchers, torch's intra-op threads) allocate tensors of many sizes. (2) The mmap threshold is dynamic:
after a large block is freed the threshold rises (up to 32 MiB), so later tensors of that size are
carved from the heap instead of mapped, and the heap fragments. A fixed threshold keeps every large
tensor in its own mapping, returned to the system when freed; a cap of two arenas is the usual server
setting (MALLOC_ARENA_MAX=2). Applied with mallopt at start-up, before the threads exist, because the
MALLOC_* environment variables are read only when a process starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1 << 20  # tensors of 1 MiB and more are mapped (a decoder block's mel is larger)


def tune_malloc(arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """True when glibc took both settings; False where there is no glibc (musl, macOS): nothing to do."""
    if arenas < 1 or mmap_threshold < 0:
        raise ValueError(f"arenas must be >= 1 and the mmap threshold >= 0, got {arenas}, {mmap_threshold}")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_ARENA_MAX, arenas) == 1 and mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1


# The encoder and decoder run on jemalloc where it is installed (LD_PRELOAD: the allocator must be in
# place before the process starts; deploy/Dockerfile installs libjemalloc2). Soak, 10 min, 8 callers
# (loadtest/README.md): the decoder on glibc, tuned as above, still grew in steps to the end (second
# half +7.5 %); on jemalloc it levelled off after its first minutes (second half +0.5 %). What made
# it climb was forwards spread over several threads, each with its own arena (common/batcher.py now
# runs them on one): with that, +1.65 % from minute 2 to minute 10.
JEMALLOC = "libjemalloc.so.2"


def jemalloc_preload(environ: dict[str, str]) -> dict[str, str]:
    """environ with jemalloc preloaded when this machine has it, and no LD_PRELOAD is set already."""
    if "LD_PRELOAD" in environ or ctypes.util.find_library("jemalloc") is None:
        return environ
    return {**environ, "LD_PRELOAD": JEMALLOC}
