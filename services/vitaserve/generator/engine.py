"""Continuous batching over the static KV cache: every running call advances one token per step.

`step()` is schedule, run, postprocess (nano-vllm's shape): waiting requests take free cache slots,
each running sequence contributes the plan of its next token (a backbone or an MCTP step of its own
schedule), `run_step` batches plans of the same kind, and finished sequences free their slots.
The engine is synchronous and single-threaded; the Triton adapter drives it from its own thread
(engine_service.py), and `generate()` drives it with one request: there is one generation loop.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from vitaserve.generator.language_model import LanguageModel
from vitaserve.generator.runner import run_step
from vitaserve.generator.sampling import make_generator
from vitaserve.generator.sequence import Sequence
from vitaserve.lmtext.sampling_params import SamplingParams


class EngineFull(Exception):
    """The waiting queue is at its limit: the caller gets RESOURCE_EXHAUSTED and retries elsewhere."""


@dataclass(frozen=True)
class TokenEvent:
    index: int  # 0-based among the new tokens
    token_id: int
    kind: str  # "M": backbone step, "m": MCTP step
    module: int  # MCTP module index, -1 for backbone
    is_audio: bool
    elapsed_s: float  # from the request's arrival (queueing and prefill included) until this token existed
    finished: bool  # last token of the call (an end id, or max_new_tokens reached)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    mode: str | list[int] | None = None
    sampling: SamplingParams | None = None
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] | None = None


@dataclass
class _Running:
    request: Request
    seq: Sequence
    stop: set[int]
    started: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, lm: LanguageModel, max_waiting: int = 0):
        """max_waiting: requests that may wait for a free slot (0: as many as there are slots). A
        waiting request gets a slot only when a running answer ends, and the gateway gives up on a
        request whose first token takes longer than its token gap (5 s): a deeper queue only holds
        requests that fail anyway, and hides from the autoscaler that this instance is full."""
        self.lm = lm
        self.max_waiting = max_waiting or lm.model.num_slots
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.waiting: deque[tuple[Request, float]] = deque()
        self.running: dict[str, _Running] = {}
        self.free_slots = list(range(lm.model.num_slots))[::-1]

    def add(self, request: Request) -> None:
        """Queue a call; invalid prompts and settings raise ValueError here, before any GPU work."""
        self.lm.validate_prompt(request.prompt_ids, request.max_new_tokens)
        self.lm.schedule(request.mode)
        if request.request_id in self.running or any(r.request_id == request.request_id for r, _ in self.waiting):
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_room()
        self.waiting.append((request, time.perf_counter()))

    def check_room(self, handed_over: int = 0) -> None:
        """EngineFull when one more request (after `handed_over` not yet added) would wait beyond
        max_waiting; requests that the free slots will take at the next step do not wait. Reads only
        lengths, so another thread may call it (EngineService.submit)."""
        queued = len(self.waiting) + handed_over - len(self.free_slots)
        if queued >= self.max_waiting:
            raise EngineFull(f"{max(queued, 0)} requests already wait for a free slot, the limit of this "
                             "generator instance: retry later or on another instance")

    def cancel(self, request_id: str) -> bool:
        """Drop a call at once (barge-in); its slot is free for the next step."""
        if request_id in self.running:
            self._drop(request_id)
            return True
        before = len(self.waiting)
        self.waiting = deque((r, t) for r, t in self.waiting if r.request_id != request_id)
        return len(self.waiting) != before

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        device = self.lm.model.lm_head.weight.device
        while self.waiting and self.free_slots:
            request, queued = self.waiting.popleft()
            sampling = request.sampling or SamplingParams.from_defaults(self.lm.defaults)
            seq = Sequence(
                slot=self.free_slots.pop(), ids=list(request.prompt_ids), schedule=self.lm.schedule(request.mode),
                num_modules=self.lm.config.num_nextn_predict_layers, sampling=sampling,
                generator=make_generator(sampling, device),
            )
            stop = set(self.lm.stop_ids() if request.stop_ids is None else request.stop_ids)
            self.running[request.request_id] = _Running(request, seq, stop, started=queued)

    def step(self) -> list[tuple[str, TokenEvent | Exception]]:
        """Advance every running call by one token; returns (request id, event) pairs, where a call
        that failed alone (its plan, forward or sampling raised) gets its exception and is dropped."""
        self._admit()
        if not self.running:
            return []
        out: list[tuple[str, TokenEvent | Exception]] = []
        items, plans = [], []
        for rid, run in list(self.running.items()):
            try:
                plans.append(run.seq.plan())
                items.append((rid, run))
            except Exception as exc:
                self._drop(rid)
                out.append((rid, exc))
        kinds = [r.seq.next_step for _, r in items]
        results = run_step(self.lm.model, plans) if plans else []
        if self.lm.model.lm_head.weight.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        for (rid, run), (kind, module), token in zip(items, kinds, results):
            if isinstance(token, Exception):
                self._drop(rid)
                out.append((rid, token))
                continue
            index = run.seq.num_new - 1
            finished = token in run.stop or index == run.request.max_new_tokens - 1
            event = TokenEvent(index, token, kind, module, self.lm.vocab.is_audio(token), now - run.started, finished)
            out.append((rid, event))
            if finished:
                self._drop(rid)
        return out

    def _drop(self, request_id: str) -> None:
        self.free_slots.append(self.running.pop(request_id).seq.slot)
