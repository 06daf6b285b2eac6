"""A cache-free reference of the official VITA-Audio token stream, for tests only.

Every token is recomputed from scratch: backbone over the whole prefix, then each MCTP module in turn
over all rows. By causality this is exactly what the official cached code computes.
"""

from __future__ import annotations

import itertools

import torch

from vitaserve.generator.sampling import select_token
from vitaserve.lmtext.sampling_params import SamplingParams
from vitaserve.lmtext.schedule import Schedule


def _positions(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n)[None]


@torch.inference_mode()
def reference_logits(model, ids: list[int], kind: str, module: int) -> torch.Tensor:
    length = len(ids)
    rows = length if kind == "M" else length - module - 1
    h = model.forward_backbone(torch.tensor([ids[:rows]]), _positions(0, rows), None)
    if kind == "M":
        return model.logits(h[0, -1]).float()
    for k in range(module + 1):
        h = model.forward_mtp(k, torch.tensor([ids[k + 1 : k + 1 + rows]]), h, _positions(k + 1, rows), None)
    return model.logits(h[0, -1]).float()


def reference_generate(model, prompt: list[int], schedule: Schedule, n: int, sampling=SamplingParams()) -> list[int]:
    ids = list(prompt)
    for kind, module in itertools.islice(schedule.steps(), n):
        logits = reference_logits(model, ids, kind, module)
        ids.append(select_token(logits, torch.tensor(ids), sampling, None))
    return ids[len(prompt) :]
