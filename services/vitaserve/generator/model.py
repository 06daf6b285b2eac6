"""VITA-Audio language model: a Qwen2 backbone plus the MCTP ("mtp") modules, as plain modules.

Attribute names follow the released checkpoint exactly (`model.embed_tokens`, `model.layers.{i}`,
`model.norm`, `lm_head`, `mtp_projs.{i}`, `mtp_embed_norms.{i}`, `mtp_hidden_norms.{i}`), so the
released safetensors load with strict checking. The last `num_nextn_predict_layers` entries of
`model.layers` are the decoder layers of the MCTP modules, not part of the backbone.

Every decoder layer owns a static, preallocated KV cache of shape
[num_slots, kv_heads, max_len, head_dim] (gpt-fast style): a sequence lives in one slot, so the
engine can batch sequences of different lengths. Each forward writes the new rows at their cache
indices and attends, per row, to cache indices <= its own (plain causal attention, which is what the
official code computes with flash-attention: bottom-right aligned when a multi-token catch-up runs
over a filled cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitaserve.generator.linear import Linear
from vitaserve.lmtext.config import LMConfig


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: normalise in fp32, cast back, then scale (the official order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_table(max_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [max_len, head_dim] for positions 0..max_len-1, computed as Qwen2 computes them
    (inv_freq times position in fp32), so a lookup equals the on-the-fly values bit for bit."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(max_len, device=device).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class KVCache(nn.Module):
    """Static per-layer cache. Rows are written at (slot, cache index); never grows."""

    def __init__(self, num_slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, batch: "BatchIndex | StaticRows", k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kvh, T, D] at the valid (slot, index) pairs; return [B, kvh, kv_len, D] to attend."""
        if isinstance(batch, StaticRows):  # padding entries write to the scratch slot
            self.k_cache[batch.write_slots, :, batch.write_index] = k.transpose(1, 2)  # [B, T, kvh, D]
            self.v_cache[batch.write_slots, :, batch.write_index] = v.transpose(1, 2)
            return (self.k_cache[:, :, : batch.kv_len].index_select(0, batch.slots),
                    self.v_cache[:, :, : batch.kv_len].index_select(0, batch.slots))
        if batch.single:
            slot, start, n = batch.slot_range[0], batch.starts[0], batch.lengths[0]
            self.k_cache[slot, :, start : start + n] = k[0]
            self.v_cache[slot, :, start : start + n] = v[0]
        else:
            self.k_cache[batch.flat_slots, :, batch.flat_index] = k.transpose(1, 2).flatten(0, 1)[batch.flat_rows]  # [N, kvh, D]
            self.v_cache[batch.flat_slots, :, batch.flat_index] = v.transpose(1, 2).flatten(0, 1)[batch.flat_rows]
        if batch.slot_range is not None:  # contiguous slots: a view, no copy
            lo, hi = batch.slot_range
            return self.k_cache[lo:hi, :, : batch.kv_len], self.v_cache[lo:hi, :, : batch.kv_len]
        return self.k_cache[batch.slots, :, : batch.kv_len], self.v_cache[batch.slots, :, : batch.kv_len]


class BatchIndex:
    """Where a forward's rows live, shared by all its layers.

    Row b holds lengths[b] valid entries (the rest of the width is padding) written at cache indices
    starts[b].. in slot slots[b]. Built from Python lists so no device sync is needed. A lone row
    takes a fast path: plain slice writes, and no mask when it is a single token.
    """

    def __init__(self, slots: list[int], starts: list[int], lengths: list[int], device,
                 cache_index: torch.Tensor | None = None):
        """cache_index: the [B, width] indices (-1: padding) already on `device`, when the caller
        packed them with its other inputs (runner.forward_plans: one host-to-device copy)."""
        width = max(lengths)
        self.kv_len = max(s + n for s, n in zip(starts, lengths))
        self.single = len(slots) == 1
        self.slot_range = (slots[0], slots[0] + len(slots)) if slots == list(range(slots[0], slots[0] + len(slots))) else None
        self.starts, self.lengths = starts, lengths
        if cache_index is None:
            cache_index = torch.tensor([list(range(s, s + n)) + [-1] * (width - n) for s, n in zip(starts, lengths)],
                                       device=device)
        # slots, the valid (slot, index) pairs and their rows (b * width + t) from the host lists in one
        # copy: no boolean indexing, which would wait for the device
        flat = ([s for s, n in zip(slots, lengths) for _ in range(n)]
                + [i for s, n in zip(starts, lengths) for i in range(s, s + n)]
                + [b * width + t for b, n in enumerate(lengths) for t in range(n)])
        packed = torch.tensor(list(slots) + flat, device=device)
        self.slots, self.flat_slots, self.flat_index, self.flat_rows = packed.split([len(slots)] + [len(flat) // 3] * 3)
        if self.single and width == 1:
            self.mask = None  # one query at the end of the cache sees every key
        else:
            ks = torch.arange(self.kv_len, device=device)
            # [B, 1, T, kv_len]: key k visible to query (b, t) iff k <= its cache index; padding sees key 0
            self.mask = (ks[None, None, :] <= cache_index.clamp(min=0)[:, :, None])[:, None]


class StaticRows:
    """Where a static-shape forward's rows live: [B, T] entries whose shapes are fixed by the batch
    bucket, the rows bucket and `kv_len`, built from device tensors only, so the forward can be
    captured in a CUDA graph and replayed with new values (generator/cuda_graphs.py).

    An entry with cache index -1 is padding, as in BatchIndex: it writes its k/v to the cache's
    scratch slot (`num_slots`, which no real row attends) at index 0, and attends key 0 only. A row
    whose entries are all padding has slot `num_slots` too. Keys at or past `kv_len` are not read."""

    def __init__(self, slots: torch.Tensor, cache_index: torch.Tensor, scratch_slot: int, kv_len: int):
        self.kv_len = kv_len
        self.slots = slots  # [B]
        scratch = torch.full_like(cache_index, scratch_slot)  # a device fill, safe inside a graph capture
        self.write_slots = torch.where(cache_index >= 0, slots[:, None], scratch)  # [B, T]
        self.write_index = cache_index.clamp(min=0)  # [B, T]
        ks = torch.arange(kv_len, device=slots.device)
        self.mask = (ks[None, None, :] <= self.write_index[:, :, None])[:, None]  # [B, 1, T, kv_len]


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.dim_per_head
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, batch: BatchIndex | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if batch is None:  # no cache: plain causal attention over this input only
            y = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=self.n_kv != self.n_heads)
        else:
            k, v = self.kv_cache.update(batch, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch: BatchIndex | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Body(nn.Module):
    """`model.*` of the checkpoint: embeddings, all decoder layers (backbone + MCTP), final norm."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class VitaAudioLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Body(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        n, h = cfg.num_nextn_predict_layers, cfg.hidden_size
        self.mtp_projs = nn.ModuleList(Linear(2 * h, h, bias=False) for _ in range(n))
        self.mtp_embed_norms = nn.ModuleList(RMSNorm(h, cfg.rms_norm_eps) for _ in range(n))
        self.mtp_hidden_norms = nn.ModuleList(RMSNorm(h, cfg.rms_norm_eps) for _ in range(n))
        self.num_slots = 0
        self.max_len = 0
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # Optional speed-up that changes results (off by default): MCTP steps score only these
        # lm_head rows (the 16384 audio ids), about 10x cheaper than the full 168072-row head.
        self.mtp_audio_rows: slice | None = None
        # One-row steps at static shapes, replayed as CUDA graphs on cuda (generator/cuda_graphs.py);
        # None: every step runs the eager BatchIndex path.
        self.decode_graphs = None

    # -- caches -------------------------------------------------------------------------------
    def setup_caches(self, num_slots: int, max_len: int) -> None:
        """Allocate every layer's KV cache once: num_slots sequences of up to max_len tokens."""
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        w = self.lm_head.weight
        for layer in self.model.layers:  # one more slot: the scratch slot of StaticRows' padding rows
            layer.self_attn.kv_cache = KVCache(num_slots + 1, cfg.num_key_value_heads, max_len, cfg.dim_per_head, w.dtype, w.device)
        self.num_slots, self.max_len = num_slots, max_len

    # -- forwards -----------------------------------------------------------------------------
    def _rope(self, rope_pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_len:  # with caches, positions stay below the table's length: no device read (a sync)
            cos, sin = self.rope_table_for_static()
            return cos[rope_pos].to(dtype), sin[rope_pos].to(dtype)
        n = int(rope_pos.max()) + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < n:
            size = max(n, self.max_len, 1)
            self._rope_cache = rope_table(size, self.config.dim_per_head, self.config.rope_theta, rope_pos.device)
        cos, sin = self._rope_cache
        return cos[rope_pos].to(dtype), sin[rope_pos].to(dtype)

    def _run_layers(self, x, layer_ids, rope_pos, batch):
        cos, sin = self._rope(rope_pos, x.dtype)
        for i in layer_ids:
            x = self.model.layers[i](x, cos, sin, batch)
        return self.model.norm(x)

    def forward_backbone(self, ids: torch.Tensor, rope_pos: torch.Tensor, batch: BatchIndex | None) -> torch.Tensor:
        """Backbone ("M") over ids [B, T] at positions rope_pos; returns normed hidden [B, T, H]."""
        x = self.model.embed_tokens(ids)
        return self._run_layers(x, range(self.config.num_backbone_layers), rope_pos, batch)

    def forward_mtp(
        self, module: int, ids: torch.Tensor, hidden: torch.Tensor, rope_pos: torch.Tensor, batch: BatchIndex | None
    ) -> torch.Tensor:
        """MCTP module `module` ("m"): hidden [B, T, H] is the previous stage's normed output at row j,
        ids the token at row j + module + 1 (the official shift) and rope_pos that token's position."""
        e = self.model.embed_tokens(ids)
        x = torch.cat((self.mtp_embed_norms[module](e), self.mtp_hidden_norms[module](hidden)), dim=-1)
        x = self.mtp_projs[module](x)
        return self._run_layers(x, [self.config.mtp_layer_index(module)], rope_pos, batch)

    def rope_table_for_static(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rope table for every position a step over the caches can use (cache length + one per
        MCTP module: an MCTP row sits module + 1 positions past its cache index), built once so no
        forward asks the device how long it must be."""
        need = self.max_len + self.config.num_nextn_predict_layers + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
            self._rope_cache = rope_table(need, self.config.dim_per_head, self.config.rope_theta,
                                          self.lm_head.weight.device)
        return self._rope_cache

    def forward_static(self, module: int, ids: torch.Tensor, rope_pos: torch.Tensor, slots: torch.Tensor,
                       cache_index: torch.Tensor, hidden: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        """forward_backbone (module -1) or forward_mtp at static shapes: ids / rope_pos / cache_index
        [B, T] (cache index -1: a padding entry), slots [B], hidden [B, T, H] for MCTP; attends keys
        0..kv_len-1. Same result as with a BatchIndex of the same rows, and no host-side work, so it
        can be captured in a CUDA graph."""
        cos, sin = self.rope_table_for_static()
        x = self.model.embed_tokens(ids)
        if module >= 0:
            x = torch.cat((self.mtp_embed_norms[module](x), self.mtp_hidden_norms[module](hidden)), dim=-1)
            x = self.mtp_projs[module](x)
            layer_ids = [self.config.mtp_layer_index(module)]
        else:
            layer_ids = range(self.config.num_backbone_layers)
        batch = StaticRows(slots, cache_index, self.num_slots, kv_len)
        cos, sin = cos[rope_pos].to(x.dtype), sin[rope_pos].to(x.dtype)
        for i in layer_ids:
            x = self.model.layers[i](x, cos, sin, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def logits_rows(self, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        """Scores of the lm_head rows `rows` only (the MCTP audio head)."""
        return F.linear(hidden, self.lm_head.weight[rows])
