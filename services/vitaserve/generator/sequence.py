"""One sequence's generation state, and the plan of its next forward.

The official model keeps, per call, every id, and for k = 0..10 the normed outputs of stage k
(k = 0 backbone, k = i + 1 MCTP module i). MCTP module i at "row" j combines stage i's output at j with
the embedding of id j + i + 1 (at rotary position j + i + 1) and catches up on every row its own KV
cache has not seen. Here only the rows a stage has not consumed yet are kept ("pending"), and only for
modules the schedule will still use, so memory stays bounded.
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
    seen_ids: torch.Tensor | None = None  # for the repetition penalty

    def __post_init__(self):
        self.prompt_len = len(self.ids)
        self.mtp_seen = [0] * self.num_modules
        self.pending = [None] * self.num_modules
        self.steps = self.schedule.steps()
        self.next_step = next(self.steps)

    @property
    def num_new(self) -> int:
        return len(self.ids) - self.prompt_len

    def plan(self) -> StepPlan:
        kind, module = self.next_step
        length = len(self.ids)
        if kind == "M":
            start = self.backbone_seen
            return StepPlan(self, "M", -1, self.ids[start:], None, start, start)
        start = self.mtp_seen[module]
        hidden = self.pending[module]
        rows = length - module - 1 - start
        if hidden is None or hidden.shape[0] != rows:
            raise RuntimeError(f"MCTP module {module}: {0 if hidden is None else hidden.shape[0]} pending rows, expected {rows}")
        return StepPlan(self, "m", module, self.ids[start + module + 1 :], hidden, start + module + 1, start)

    def commit(self, plan: StepPlan, hidden: torch.Tensor, token_id: int) -> None:
        """Record the forward's output rows [T, H] and the chosen token; advance the schedule."""
        if plan.kind == "M":
            self.backbone_seen = len(self.ids)
            out_stage = 0
        else:
            self.mtp_seen[plan.module] += hidden.shape[0]
            self.pending[plan.module] = None
            out_stage = plan.module + 1
        if self._keeps(out_stage):
            prev = self.pending[out_stage]
            self.pending[out_stage] = hidden if prev is None else torch.cat((prev, hidden))
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
