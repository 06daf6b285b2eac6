"""Token selection with the semantics of HF `generate` (the official code path), for a whole batch.

Order as in transformers: repetition penalty over every id of the sequence (prompt included; it also
applies to greedy decoding, and the released generation_config.json sets 1.05), then, only when
sampling, temperature, top-k and top-p. Logits are processed in fp32. Each sequence draws from its
own `torch.Generator`, so a seed reproduces a call without touching the process-wide RNG.

`BatchSampler` does this for every row of a step with tensor ops: the penalty reads a per-slot
buffer of the sequence's ids (appended in place with each committed token, never rebuilt from the id
list) and gathers/scatters only those ids, as transformers does for a batch, greedy rows are one
argmax for the batch, and the step's tokens and failure flags reach the host in ONE
transfer. Only sampled rows loop: the draw runs per row (torch.multinomial with the row's own
generator, a kernel launch with no host sync), because a single batched draw cannot take one
generator per row, so seeded calls give the same tokens as before; on the CPU their warpers run
per row too (BatchSampler._chunks says why), and a row with top-k set draws from its kept ids
alone, bit-identical and ~3x cheaper (kept_draw.py). Greedy rows never loop. The single-row functions
below are the reference the tests compare the batch path against.
"""

from __future__ import annotations

import torch

from vitaserve.generator import kept_draw
from vitaserve.lmtext.sampling_params import SamplingParams


class SamplingFailed(Exception):
    """This row's scores are not a distribution (NaN, or nothing left to draw): the call fails alone."""


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The call's own generator (None when greedy): a seed reproduces a call without touching the
    process-wide RNG."""
    if not params.do_sample:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


# -- one row (reference semantics) ------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V] fp32; seen_ids [N]: every id so far. Divide positive, multiply negative scores."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    score = logits.gather(0, seen_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen_ids, score)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p (HF's warpers, min_tokens_to_keep = 1) on logits [V]."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - params.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def select_token(
    logits: torch.Tensor, seen_ids: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick the next id from one row of logits [V]."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, params.repetition_penalty)
    if not params.do_sample:
        return int(torch.argmax(logits))
    probs = warp(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# -- the whole batch ----------------------------------------------------------------------------------
def penalize(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32 (changed in place and returned), seen_ids [B, L] every id of each row
    (repeats allowed: a row shorter than L is padded with one of its own ids), penalty [B] fp32.

    transformers' batched gather/scatter over the ids only, never the whole vocabulary: the same fp32
    operations per element as the one-row path (x * p or x / p, one rounding each), and a repeated
    id scatters the same value twice. A penalty of 1.0 leaves the row unchanged (x * 1 = x / 1 = x)."""
    p = penalty[:, None]
    score = logits.gather(1, seen_ids)
    return logits.scatter_(1, seen_ids, torch.where(score < 0, score * p, score / p))


def warp_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """HF's temperature, top-k and top-p warpers with each row's own values on logits [B, V]. Only the
    work some row needs runs: one topk of the largest k in the batch, and the full sort of top-p only
    for the rows that use it. The choices are made from the host-side settings: no device read."""
    device, vocab = logits.device, logits.shape[-1]
    logits = logits / torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)[:, None]
    ks = [min(p.top_k, vocab) for p in params]
    if max(ks) > 0:
        k = torch.tensor(ks, device=device)
        values = torch.topk(logits, max(ks), dim=-1).values
        kth = values.gather(1, (k - 1).clamp(min=0)[:, None])  # the k-th largest, as topk(k).values[-1]
        kth = torch.where(k[:, None] > 0, kth, float("-inf"))  # a row without top-k removes nothing
        logits = logits.masked_fill(logits < kth, float("-inf"))
    rows = [b for b, p in enumerate(params) if p.top_p < 1.0]
    if rows:
        every = len(rows) == len(params)
        sub = logits if every else logits[rows]
        sorted_asc, order = torch.sort(sub, dim=-1, descending=False)
        cum = sorted_asc.softmax(-1).cumsum(-1)
        threshold = torch.tensor([1 - params[b].top_p for b in rows], dtype=torch.float32, device=device)
        remove = cum <= threshold[:, None]
        remove[:, -1] = False  # always keep the most likely token
        sub = sub.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        if every:
            return sub
        logits[rows] = sub
    return logits


class BatchSampler:
    """Per-slot sampling state on the model's device, and the batched selection of a step's tokens.

    `ids[slot, :lengths[slot]]` are the ids of that slot's sequence: the prompt when a call takes the
    slot (`start`), then each committed token written in place (`commit`), so the penalty never
    rebuilds the id list; the rest of the row repeats the prompt's first id (a harmless repeat for
    the penalty's gather/scatter). The penalty of each slot lives in a small tensor filled at `start`,
    so a step gathers it with one index."""

    def __init__(self, num_slots: int, vocab_size: int, device, max_len: int):
        self.device = device
        self.ids = torch.zeros(num_slots, max_len, dtype=torch.long, device=device)
        self.lengths = [0] * num_slots
        self.penalty = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.params: list[SamplingParams | None] = [None] * num_slots
        self.generators: list[torch.Generator | None] = [None] * num_slots

    def start(self, slot: int, prompt_ids: list[int], params: SamplingParams,
              generator: torch.Generator | None) -> None:
        if len(prompt_ids) > self.ids.shape[1]:
            raise ValueError(f"prompt of {len(prompt_ids)} ids exceeds the context ({self.ids.shape[1]})")
        self.ids[slot] = prompt_ids[0]
        self.ids[slot, : len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        self.lengths[slot] = len(prompt_ids)
        self.penalty[slot] = params.repetition_penalty
        self.params[slot], self.generators[slot] = params, generator

    @torch.inference_mode()
    def select(self, logits: torch.Tensor, slots: list[int]) -> tuple[list[int], list[bool]]:
        """Tokens for rows `slots` of logits [B, V] (changed in place), and whether each row failed
        (NaN scores, or a sampled row whose probabilities are not a distribution). One host transfer."""
        index = torch.tensor(slots, dtype=torch.long, device=logits.device)
        width = max(self.lengths[s] for s in slots)
        scores = penalize(logits.float(), self.ids[index, :width], self.penalty[index])
        tokens = torch.argmax(scores, dim=-1)
        # argmax propagates NaN (a NaN compares as the largest), so a row with any NaN picks one:
        # checking the picked score finds every NaN row in O(B), not O(B * V)
        failed = scores.gather(1, tokens[:, None])[:, 0].isnan()
        sampled = [b for b, s in enumerate(slots) if self.params[s].do_sample]
        kept = {}  # CPU rows with top-k: drawn from their kept ids alone, the same tokens (kept_draw.py)
        if sampled and torch.device(self.device).type == "cpu" and kept_draw.usable():
            for b in sampled:
                token = kept_draw.kept_draw(scores[b], self.params[slots[b]], self.generators[slots[b]])
                if token is not None:
                    kept[b] = token
        rest = [b for b in sampled if b not in kept]
        if sampled:
            draws = [torch.tensor(list(kept.values()), dtype=torch.long, device=logits.device)]
            bads = [torch.zeros(len(kept), dtype=torch.bool, device=logits.device)]
            for chunk in self._chunks(rest):
                warped = warp_batch(scores[chunk], [self.params[slots[b]] for b in chunk])
                # softmax is a distribution iff the row's largest score is finite: NaN, +inf (e.g. a
                # temperature of 1e-45) or nothing left (all -inf) are not. Such a row draws from a
                # harmless uniform stand-in, so multinomial never raises mid-batch; it fails through
                # `failed` after the single transfer below.
                bad = ~torch.isfinite(warped.max(-1).values)
                probs = warped.masked_fill_(bad[:, None], 0.0).softmax(-1)
                draws += [torch.multinomial(probs[j], 1, generator=self.generators[slots[b]])
                          for j, b in enumerate(chunk)]
                bads.append(bad)
            rows = torch.tensor(list(kept) + rest, dtype=torch.long, device=logits.device)
            tokens = tokens.index_copy(0, rows, torch.cat(draws))
            failed = failed.index_copy(0, rows, failed[rows] | torch.cat(bads))
        host = torch.stack((tokens, failed.long())).tolist()  # the step's one device-to-host transfer
        return host[0], [bool(f) for f in host[1]]

    def _chunks(self, rows: list[int]) -> list[list[int]]:
        """Sampled rows warped together: the whole batch on a GPU; one row at a time on the CPU,
        where a [B, V] fp32 block (10.7 MB for 16 rows of the 168072 ids) falls out of the cache
        and each full-vocabulary pass (sort, softmax, cumsum, masks) was measured ~2x slower per
        row than on a lone row. No host work either way: the loop only launches ops."""
        if torch.device(self.device).type == "cuda":
            return [rows]
        return [[b] for b in rows]

    def commit(self, slots: list[int], tokens: list[int]) -> None:
        """Append each slot's new token to its ids (in place)."""
        if not slots:
            return
        where = [self.lengths[s] for s in slots]
        if max(where) >= self.ids.shape[1]:
            raise ValueError("a sequence outgrew the sampler's id buffer (the context length)")
        packed = torch.tensor([slots, where, tokens], dtype=torch.long, device=self.device)
        self.ids[packed[0], packed[1]] = packed[2]
        for s in slots:
            self.lengths[s] += 1
