"""The one strict comparison of a checkpoint's keys and shapes with a model's, for every loader.

Each loader raises its own error class with the returned message, so a user reads which file and
which keys: missing, unexpected, and mis-shaped (with both shapes).
"""

from __future__ import annotations


def _describe(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """None when the key sets and shapes agree, else one line naming every problem."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k} (file {list(found[k])}, model {list(expected[k])})"
                       for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    problems = [f"{what}: {_describe(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]
    return "; ".join(problems) or None


def shapes_of(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}
