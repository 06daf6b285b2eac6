"""Which running calls advance in the next engine step, and how many rows each may run.

The policy protects first audio without starving anyone:
- A call past its first audio chunk ("running") runs its whole step every step: a decode step, or
  the short backbone catch-up after an MCTP run (bounded by the schedule, at most 11 rows).
- A running call that is comfortably ahead of real time (more than `lead_tokens` audio tokens
  beyond 12.5 per second since its first chunk) waits while some call is joining: the joiner's steps
  are then as small as a lone call's. It runs again as soon as it is no longer that far ahead, so
  every call keeps real-time audio; with nobody joining, every call runs every step.
- A call that has not yet produced its first chunk ("joining") runs every step too, but its
  multi-row work (prefill, the first MCTP catch-ups over the prompt) shares a per-step row budget
  (`step_tokens`, minus the rows of the running calls) in arrival order: a long prompt is prefilled
  in chunks over several steps, so running calls' decode steps are not held up by one huge forward.
  The first joiner gets at least `min_chunk` rows, so prefill always progresses.
Pure data in, decisions out: the engine passes `CallState`s and applies the returned limits.
"""

from __future__ import annotations

from dataclasses import dataclass

AUDIO_TOKENS_PER_S = 12.5  # the codec's rate: one audio token is 80 ms of speech
FIRST_CHUNK_TOKENS = 11  # one backbone token plus a 10-token audio chunk


@dataclass(frozen=True)
class SchedulerConfig:
    step_tokens: int = 512  # rows per step for all multi-row forwards together
    min_chunk: int = 32  # rows the first waiting prefill gets even when one-row steps fill the budget
    lead_tokens: float = 12.5  # audio a call must be ahead of real time (1 s) before it may wait
    # count every token after the first chunk as audio: for benchmarks on random weights, which emit
    # audio ids about one time in ten (16384 of 168072), and whose real-time check counts every token
    every_token_is_audio: bool = False

    def __post_init__(self):
        if self.step_tokens < 1 or self.min_chunk < 1 or not 0 <= self.lead_tokens < float("inf"):
            raise ValueError(f"scheduler settings: step_tokens and min_chunk must be >= 1 and lead_tokens "
                             f"a finite number >= 0, got {self}")

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> "SchedulerConfig":
        """From the Triton model config's string parameters (step_tokens, min_chunk, lead_tokens); an
        empty or absent one keeps its default; a bad one raises ValueError naming it."""
        out = {}
        for name, kind in (("step_tokens", int), ("min_chunk", int), ("lead_tokens", float)):
            text = (values.get(name) or "").strip()
            if text:
                try:
                    out[name] = kind(text)
                except ValueError:
                    raise ValueError(f"scheduler setting {name} must be a{'n integer' if kind is int else ' number'}, "
                                     f"got {text!r}") from None
        return cls(**out)


@dataclass(frozen=True)
class CallState:
    key: str
    rows: int  # rows its next step needs (1 for a plain decode step)
    arrived: float  # perf_counter time it was queued
    new_tokens: int  # tokens it has produced
    audio_tokens: int = 0  # audio tokens produced since its first chunk
    first_chunk_at: float | None = None  # when its first chunk was complete (None: still joining)

    @property
    def joining(self) -> bool:
        return self.first_chunk_at is None

    def lead(self, now: float) -> float:
        """Audio tokens it is ahead of real time (negative: behind)."""
        if self.first_chunk_at is None:
            return 0.0
        return self.audio_tokens - AUDIO_TOKENS_PER_S * (now - self.first_chunk_at)


def decide(calls: list[CallState], now: float, cfg: SchedulerConfig = SchedulerConfig()) -> dict[str, int]:
    """{key: rows it may run this step} for the calls that run; calls left out wait this step."""
    anyone_joining = any(c.joining for c in calls)
    out = {c.key: c.rows for c in calls
           if not c.joining and not (anyone_joining and c.lead(now) > cfg.lead_tokens)}
    budget = cfg.step_tokens - sum(out.values())
    for i, c in enumerate(sorted((c for c in calls if c.joining), key=lambda c: c.arrived)):
        take = min(c.rows, max(budget, cfg.min_chunk if i == 0 else 0))
        if take <= 0:
            break
        out[c.key] = take
        budget -= take
    return out
