"""Random draws for a batch whose rows belong to different streams, each with its own generator.

The decoder's randomness (flow start noise, SineGen phases and noise) is per stream: a stream's audio
must not depend on which other streams happened to share its batch. A single generator (or None)
draws the whole tensor at once, as the official code does; a sequence of generators gives row b its
own draw of shape (1, ...) from generators[b], in the same order a batch of one would draw it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator | None] | None


def per_row(generators: Generators) -> bool:
    return isinstance(generators, (list, tuple))


def draw(kind: str, shape: Sequence[int], generators: Generators, device: torch.device | str,
         dtype: torch.dtype = torch.float32, none_device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.randn ("normal") or torch.rand ("uniform") of `shape`, returned on `device`.

    Each draw happens on its generator's device (a generator can only draw there) and is then moved;
    with no generator it comes from the global RNG of `none_device`.
    """
    if kind not in ("normal", "uniform"):
        raise ValueError(f"kind must be 'normal' or 'uniform', got {kind!r}")
    if per_row(generators):
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]} rows")
        row = (1, *shape[1:])
        return torch.cat([draw(kind, row, g, device, dtype, none_device) for g in generators])
    fn = torch.randn if kind == "normal" else torch.rand
    at = generators.device if generators is not None else torch.device(none_device)
    return fn(tuple(shape), generator=generators, device=at, dtype=dtype).to(device)
