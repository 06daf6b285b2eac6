"""Continuous batching over the static KV cache: every running call advances one token per step.

`step()` is schedule, run, postprocess (nano-vllm's shape): waiting requests take free cache slots,
the scheduler (scheduler.py) picks which running sequences advance and how many rows each may run
(chunked prefill under a per-step budget, joining calls first), each contributes the plan of its next
token (a backbone or an MCTP step of its own schedule), `run_step` batches plans of the same kind and
samples the whole batch at once, and finished sequences free their slots. The only host sync of a
step is the transfer of its tokens (sampling.BatchSampler.select).
The engine is synchronous and single-threaded; the Triton adapter drives it from its own thread
(engine_service.py), and `generate()` drives it with one request: there is one generation loop.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from vitaserve.generator.language_model import LanguageModel
from vitaserve.generator.runner import run_step
from vitaserve.generator.sampling import BatchSampler, make_generator
from vitaserve.generator.scheduler import FIRST_CHUNK_TOKENS, CallState, SchedulerConfig, decide
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
    audio_tokens: int = 0  # since its first chunk
    first_chunk_at: float | None = None

    def state(self, key: str) -> CallState:
        return CallState(key, self.seq.rows_needed(), self.started, self.seq.num_new, self.audio_tokens,
                         self.first_chunk_at)


class Engine:
    def __init__(self, lm: LanguageModel, max_waiting: int = 0, scheduler: SchedulerConfig | None = None):
        """max_waiting: requests that may wait for a free slot (0: as many as there are slots). A
        waiting request gets a slot only when a running answer ends, and the gateway gives up on a
        request whose first token takes longer than its token gap (5 s): a deeper queue only holds
        requests that fail anyway, and hides from the autoscaler that this instance is full.
        scheduler: the step policy's settings (scheduler.py)."""
        self.lm = lm
        self.scheduler = scheduler or SchedulerConfig()
        self.sampler = BatchSampler(lm.model.num_slots, lm.config.vocab_size, lm.model.lm_head.weight.device,
                                    lm.model.max_len)
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
            generator = make_generator(sampling, device)
            seq = Sequence(
                slot=self.free_slots.pop(), ids=list(request.prompt_ids), schedule=self.lm.schedule(request.mode),
                num_modules=self.lm.config.num_nextn_predict_layers, sampling=sampling, generator=generator,
            )
            self.sampler.start(seq.slot, request.prompt_ids, sampling, generator)
            stop = set(self.lm.stop_ids() if request.stop_ids is None else request.stop_ids)
            self.running[request.request_id] = _Running(request, seq, stop, started=queued)

    def step(self) -> list[tuple[str, TokenEvent | Exception]]:
        """Advance the running calls the scheduler picks by one token (or one prefill chunk); returns
        (request id, event) pairs, where a call that failed alone (its plan, forward or sampling
        raised) gets its exception and is dropped."""
        self._admit()
        if not self.running:
            return []
        out: list[tuple[str, TokenEvent | Exception]] = []
        limits = decide([run.state(rid) for rid, run in self.running.items()], time.perf_counter(), self.scheduler)
        items, plans = [], []
        for rid, limit in limits.items():
            run = self.running[rid]
            try:
                plans.append(run.seq.plan(limit))
                items.append((rid, run))
            except Exception as exc:
                self._drop(rid)
                out.append((rid, exc))
        kinds = [r.seq.next_step for _, r in items]
        results = run_step(self.lm.model, plans, self.sampler) if plans else []
        now = time.perf_counter()  # the tokens are on the host: run_step's transfer was the sync
        for (rid, run), (kind, module), token in zip(items, kinds, results):
            if token is None:  # a prefill chunk that is not the last: no token yet
                continue
            if isinstance(token, Exception):
                self._drop(rid)
                out.append((rid, token))
                continue
            index = run.seq.num_new - 1
            finished = token in run.stop or index == run.request.max_new_tokens - 1
            is_audio = self.lm.vocab.is_audio(token)
            if run.first_chunk_at is not None:
                run.audio_tokens += is_audio or self.scheduler.every_token_is_audio
            elif index + 1 >= FIRST_CHUNK_TOKENS:
                run.first_chunk_at = now
            event = TokenEvent(index, token, kind, module, is_audio, now - run.started, finished)
            out.append((rid, event))
            if finished:
                self._drop(rid)
        return out

    def _drop(self, request_id: str) -> None:
        self.free_slots.append(self.running.pop(request_id).seq.slot)
