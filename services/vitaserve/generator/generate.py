"""Generation of one call without HF `generate`: a stream of tokens, each tagged backbone/MCTP and
audio/text, the moment it exists, so audio can leave at once.

It is the engine's loop with a single request (the same scheduling, forwards and sampling as a
batch), so offline commands, benchmarks and tests measure exactly what the server runs.
"""

from __future__ import annotations

from collections.abc import Iterator

from vitaserve.generator.engine import Engine, Request, TokenEvent
from vitaserve.generator.language_model import LanguageModel
from vitaserve.lmtext.sampling_params import SamplingParams


def generate(
    lm: LanguageModel,
    prompt_ids: list[int],
    mode: str | list[int] | None = None,
    sampling: SamplingParams | None = None,
    max_new_tokens: int = 256,
    stop_ids: tuple[int, ...] | None = None,
) -> Iterator[TokenEvent]:
    """Stream new tokens for one call; with the official schedule, sampling rules and end ids.
    A bad prompt or mode raises ValueError; a failed forward or sampling step raises its error."""
    engine = Engine(lm)
    engine.add(Request("generate", list(prompt_ids), mode, sampling, max_new_tokens, stop_ids))
    while engine.has_work():
        for _, event in engine.step():
            if isinstance(event, Exception):
                raise event
            yield event
