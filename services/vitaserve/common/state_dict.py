"""The one strict comparison of a checkpoint's keys and shapes with a model's, for every loader.

The error names the file and every problem: missing, unexpected and mis-shaped keys (with both
shapes), so a user reads which checkpoint does not fit which config.
"""

from __future__ import annotations

from vitaserve.common.checkpoint_errors import CheckpointError


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


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str,
                 config: str) -> None:
    """CheckpointError "<source> does not match <config>: <problems>" unless keys and shapes agree."""
    problems = shape_mismatch(expected, found)
    if problems:
        raise CheckpointError(f"{source} does not match {config}: {problems}")


def load_strict(model, state: dict, source: str, config: str, assign: bool = False) -> None:
    """model.load_state_dict(state, strict=True), after a check whose error names every bad key.
    assign=True adopts the tensors as they are (a model built on the meta device)."""
    check_shapes(shapes_of(model.state_dict()), shapes_of(state), source, config)
    model.load_state_dict(state, strict=True, assign=assign)
