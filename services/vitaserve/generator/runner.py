"""Run the forwards of many sequences' step plans together, and pick their tokens.

Plans of the same kind (backbone, or the same MCTP module) share one forward: rows are padded to the
longest plan, padding is marked with cache index -1 (never written, never attended). One lm_head
product covers the last row of every plan: batching is what makes MCTP steps cheap, since each one
multiplies by the whole 168072-row lm_head.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from vitaserve.generator.model import BatchIndex, VitaAudioLM
from vitaserve.generator.sampling import BatchSampler, SamplingFailed
from vitaserve.generator.sequence import StepPlan


def forward_plans(model: VitaAudioLM, plans: list[StepPlan]) -> list[torch.Tensor]:
    """Hidden rows [T_i, H] for each plan (all of one kind and module)."""
    kind, module = plans[0].kind, plans[0].module
    device = model.lm_head.weight.device
    lengths = [len(p.ids) for p in plans]
    width = max(lengths)
    if max(p.cache_start + n for p, n in zip(plans, lengths)) > model.max_len:
        raise ValueError(f"sequence longer than the KV cache ({model.max_len} tokens)")
    # ids, rope positions and cache indices of every row, padded to the width: one host-to-device copy
    packed = []
    for p, n in zip(plans, lengths):
        pad = [0] * (width - n)
        packed += [p.ids + pad, list(range(p.rope_start, p.rope_start + n)) + pad,
                   list(range(p.cache_start, p.cache_start + n)) + [-1] * (width - n)]
    ids, rope, cache_index = torch.tensor(packed, device=device).view(len(plans), 3, width).unbind(1)
    batch = BatchIndex([p.seq.slot for p in plans], [p.cache_start for p in plans], lengths, device, cache_index)
    if kind == "M":
        out = model.forward_backbone(ids, rope, batch)
    else:
        if min(lengths) == width:  # no padding (e.g. every plan one row): one stack
            hidden = torch.stack([p.hidden for p in plans])
        else:
            hidden = torch.zeros(len(plans), width, model.config.hidden_size, dtype=out_dtype(model), device=device)
            for b, p in enumerate(plans):
                hidden[b, : len(p.ids)] = p.hidden
        out = model.forward_mtp(module, ids, hidden, rope, batch)
    return [out[b, : len(p.ids)] for b, p in enumerate(plans)]


def out_dtype(model: VitaAudioLM) -> torch.dtype:
    return model.lm_head.weight.dtype


@torch.inference_mode()
def run_step(model: VitaAudioLM, plans: list[StepPlan], sampler: BatchSampler) -> list[int | Exception | None]:
    """One forward per (kind, module) group, one lm_head product, one token per final plan; commits.

    A final plan gets its token, a chunk that is not final gets None (its rows are committed). A plan
    that fails (a forward or a sampling error) gets its exception in place of a token and is not
    committed; the other plans go on as if it had not been there. A group whose forward fails is
    re-run one plan at a time, so only the plans that fail alone fail: a failed forward wrote only
    cache rows its sequences had not committed, which the re-run writes again."""
    # prefills (many rows) run apart from one-row steps, so short rows are not padded to a prompt
    groups: dict[tuple[str, int, bool], list[int]] = defaultdict(list)
    for i, p in enumerate(plans):
        groups[(p.kind, p.module, len(p.ids) > 1)].append(i)
    hidden: list[torch.Tensor | None] = [None] * len(plans)
    results: list[int | Exception | None] = [None] * len(plans)
    for members in groups.values():
        try:
            rows = forward_group(model, [plans[i] for i in members])
        except Exception as exc:
            rows = [exc] if len(members) == 1 else [_forward_alone(model, plans[i]) for i in members]
        for i, h in zip(members, rows):
            if isinstance(h, Exception):
                results[i] = h
            else:
                hidden[i] = h
    for i, h in enumerate(hidden):
        if h is not None and not plans[i].final:
            plans[i].seq.commit(plans[i], h)
    alive = [i for i, h in enumerate(hidden) if h is not None and plans[i].final]
    if alive:
        last = torch.stack([hidden[i][-1] for i in alive])
        logits = head_logits(model, last, [plans[i].kind == "m" for i in alive])
        slots = [plans[i].seq.slot for i in alive]
        tokens, failed = sampler.select(logits, slots)
        done_slots, done_tokens = [], []
        for i, slot, token, bad in zip(alive, slots, tokens, failed):
            if bad:  # e.g. NaN scores: this call fails, its neighbours go on
                results[i] = SamplingFailed(f"the scores of step {plans[i].seq.num_new} are not a distribution "
                                            "(NaN or nothing left to draw)")
                continue
            plans[i].seq.commit(plans[i], hidden[i], token)
            results[i] = token
            done_slots.append(slot)
            done_tokens.append(token)
        sampler.commit(done_slots, done_tokens)
    return results


def forward_group(model: VitaAudioLM, plans: list[StepPlan]) -> list[torch.Tensor]:
    """A group at static shapes through the model's decode graphs when it has them and the group
    fits (generator/cuda_graphs.py: preallocated inputs per batch bucket, replayed graphs on cuda);
    otherwise, e.g. a prefill, the eager forward."""
    graphs = getattr(model, "decode_graphs", None)
    if graphs is not None and graphs.fits(plans):
        return graphs.forward_plans(plans)
    return forward_plans(model, plans)


def _forward_alone(model: VitaAudioLM, plan: StepPlan) -> torch.Tensor | Exception:
    try:
        return forward_group(model, [plan])[0]
    except Exception as exc:
        return exc


def head_logits(model: VitaAudioLM, last: torch.Tensor, is_mtp: list[bool]) -> torch.Tensor:
    """fp32 logits [B, V]. With model.mtp_audio_rows set, MCTP rows score only the audio ids and
    every other id gets -inf (so sampling and the repetition penalty work unchanged)."""
    rows = model.mtp_audio_rows
    if rows is None or not any(is_mtp):
        return model.logits(last).float()
    out = torch.full((last.shape[0], model.config.vocab_size), float("-inf"), device=last.device)
    mtp = [i for i, m in enumerate(is_mtp) if m]
    full = [i for i, m in enumerate(is_mtp) if not m]
    if full:
        out[full] = model.logits(last[full]).float()
    out[mtp, rows] = model.logits_rows(last[mtp], rows).float()
    return out
