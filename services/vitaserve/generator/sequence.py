"""One sequence's generation state, and the plan of its next forward.

The official model keeps, per call, every id, and for k = 0..10 the normed outputs of stage k
(k = 0 backbone, k = i + 1 MCTP module i). MCTP module i at "row" j combines stage i's output at j with
the embedding of id j + i + 1 (at rotary position j + i + 1) and catches up on every row its own KV
cache has not seen. Here only the rows a stage has not consumed yet are kept ("pending"), and only for
modules the schedule will still use, so memory stays bounded.

A step may run in chunks (chunked prefill): `plan(limit)` takes at most `limit` of the rows the step
needs; a plan that leaves rows for later is not `final`, commits its rows without a token, and the
next plan goes on from there. Only the final chunk's last row is scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vitaserve.lmtext.sampling_params import SamplingParams
from vitaserve.lmtext.schedule import Schedule


@dataclass
class StepPlan:
    """Inputs of one sequence's next forward: T rows for the backbone or one MCTP module."""

    seq: "Sequence"
    kind: str  # "M" backbone, "m" MCTP
    module: int  # -1 for "M"
    ids: list[int]
    hidden: torch.Tensor | None  # [T, H] stage-`module` rows for "m"
    rope_start: int
    cache_start: int
    final: bool = True  # the step's last chunk: its last row picks the token


@dataclass
class Sequence:
    slot: int
    ids: list[int]
    schedule: Schedule
    num_modules: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    prompt_len: int = 0
    backbone_seen: int = 0
    mtp_seen: list[int] = field(default_factory=list)
    pending: list[torch.Tensor | None] = field(default_factory=list)
    steps: Iterator[tuple[str, int]] | None = None
    next_step: tuple[str, int] | None = None

    def __post_init__(self):
        self.prompt_len = len(self.ids)
        self.mtp_seen = [0] * self.num_modules
        self.pending = [None] * self.num_modules
        self.steps = self.schedule.steps()
        self.next_step = next(self.steps)

    @property
    def num_new(self) -> int:
        return len(self.ids) - self.prompt_len

    def rows_needed(self) -> int:
        """Rows the next step still has to run (the whole prompt at the first step, then about 1)."""
        kind, module = self.next_step
        if kind == "M":
            return len(self.ids) - self.backbone_seen
        return len(self.ids) - module - 1 - self.mtp_seen[module]

    def plan(self, limit: int | None = None) -> StepPlan:
        """The next forward: every row the step needs, or its first `limit` rows (not final then)."""
        kind, module = self.next_step
        length = len(self.ids)
        if kind == "M":
            start = self.backbone_seen
            take = length - start if limit is None else min(limit, length - start)
            return StepPlan(self, "M", -1, self.ids[start : start + take], None, start, start, start + take == length)
        start = self.mtp_seen[module]
        hidden = self.pending[module]
        rows = length - module - 1 - start
        if hidden is None or hidden.shape[0] != rows:
            raise RuntimeError(f"MCTP module {module}: {0 if hidden is None else hidden.shape[0]} pending rows, expected {rows}")
        take = rows if limit is None else min(limit, rows)
        first = start + module + 1
        return StepPlan(self, "m", module, self.ids[first : first + take], hidden[:take], first, start, take == rows)

    def commit(self, plan: StepPlan, hidden: torch.Tensor, token_id: int | None = None) -> None:
        """Record the forward's output rows [T, H]; for a final plan also the chosen token, and
        advance the schedule."""
        if plan.kind == "M":
            self.backbone_seen += hidden.shape[0]
            out_stage = 0
        else:
            self.mtp_seen[plan.module] += hidden.shape[0]
            rest = self.pending[plan.module][hidden.shape[0]:]
            self.pending[plan.module] = rest if rest.shape[0] else None
            out_stage = plan.module + 1
        if self._keeps(out_stage):
            prev = self.pending[out_stage]
            self.pending[out_stage] = hidden if prev is None else torch.cat((prev, hidden))
        if not plan.final:
            return
        self.ids.append(token_id)
        self.next_step = next(self.steps)
        if self.num_new == self.schedule.head_length():
            for k in range(self.schedule.tail_modules(), self.num_modules):
                self.pending[k] = None

    def _keeps(self, stage: int) -> bool:
        """Whether stage `stage`'s outputs will ever be consumed (by MCTP module `stage`)."""
        if stage >= self.num_modules or stage > self.schedule.max_module():
            return False
        if self.num_new >= self.schedule.head_length():
            return stage < self.schedule.tail_modules()
        return True
