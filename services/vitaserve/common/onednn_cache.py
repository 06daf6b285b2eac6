"""Bound oneDNN's primitive cache in a torch service, so that its resident memory levels off.

PyTorch's CPU convolutions run through oneDNN, which JIT-compiles a primitive for each new
(operation, shape) and keeps it in an LRU cache of ONEDNN_PRIMITIVE_CACHE_CAPACITY entries (1024 by
default). The decoder's shapes change with every block (its tokens, the stream's position, the batch
size) and the encoder's with every utterance's length, so the cache fills for many minutes: one
cause of the soak's decoder growth (issue 12; the soaks are in loadtest/README.md). Measured on the
tiny decoder, one thread, random turns of 10-80 tokens: RSS grew 357 -> 482 MiB over 180 turns
with the default, 355 -> 395 MiB with 8 entries (ONEDNN_VERBOSE: one decode block creates 20-65
primitives, a repeated block none). 256 entries hold the primitives of about four block shapes, a
turn's worth, for ~30 MiB at the ~120 KiB an entry cost here; CPU time per turn stayed within
run-to-run noise of the default's, where 8 entries cost ~25 %.

oneDNN reads the variable when it creates its first primitive, so this runs at start-up, before any
convolution; an operator's own ONEDNN_PRIMITIVE_CACHE_CAPACITY wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
CAPACITY = 256


def bound_primitive_cache(capacity: int = CAPACITY, environ: MutableMapping[str, str] | None = None) -> int:
    """Set the cache's capacity unless the environment already names one; returns the one in force."""
    if capacity < 0:
        raise ValueError(f"the primitive cache capacity must be >= 0, got {capacity}")
    environ = os.environ if environ is None else environ
    value = environ.setdefault(ENV, str(capacity))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r} is not a whole number of cache entries") from None
