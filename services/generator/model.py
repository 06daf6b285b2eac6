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

from vitaserve.generator.config import LMConfig


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: normalise in fp32, cast back, then scale (the official order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, head_dim] for integer positions [B, T]; computed in fp32 as Qwen2 does."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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

    def update(self, batch: "BatchIndex", k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kvh, T, D] at the valid (slot, index) pairs; return [B, kvh, kv_len, D] to attend."""
        k_rows = k.transpose(1, 2)[batch.valid]  # [N, kvh, D]
        v_rows = v.transpose(1, 2)[batch.valid]
        self.k_cache[batch.flat_slots, :, batch.flat_index] = k_rows
        self.v_cache[batch.flat_slots, :, batch.flat_index] = v_rows
        if batch.slot_range is not None:  # contiguous slots: a view, no copy
            lo, hi = batch.slot_range
            return self.k_cache[lo:hi, :, : batch.kv_len], self.v_cache[lo:hi, :, : batch.kv_len]
        return self.k_cache[batch.slots, :, : batch.kv_len], self.v_cache[batch.slots, :, : batch.kv_len]


class BatchIndex:
    """Where a forward's rows live: slot of each batch row and cache index of each (row, t).

    cache_index [B, T] with -1 for padding. Built once per forward and shared by all layers.
    """

    def __init__(self, slots: torch.Tensor, cache_index: torch.Tensor):
        self.slots = slots
        self.cache_index = cache_index
        self.valid = cache_index >= 0
        b_idx = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(cache_index)
        self.flat_slots = slots[b_idx[self.valid]]
        self.flat_index = cache_index[self.valid]
        self.kv_len = int(cache_index.max().item()) + 1
        ks = torch.arange(self.kv_len, device=cache_index.device)
        # [B, 1, T, kv_len]: key k visible to query (b, t) iff k <= its cache index
        self.mask = (ks[None, None, :] <= cache_index[:, :, None])[:, None]
        s = slots.tolist()
        contiguous = s == list(range(s[0], s[0] + len(s)))
        self.slot_range = (s[0], s[0] + len(s)) if contiguous else None


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.dim_per_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
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
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        n, h = cfg.num_nextn_predict_layers, cfg.hidden_size
        self.mtp_projs = nn.ModuleList(nn.Linear(2 * h, h, bias=False) for _ in range(n))
        self.mtp_embed_norms = nn.ModuleList(RMSNorm(h, cfg.rms_norm_eps) for _ in range(n))
        self.mtp_hidden_norms = nn.ModuleList(RMSNorm(h, cfg.rms_norm_eps) for _ in range(n))
        self.num_slots = 0
        self.max_len = 0

    # -- caches -------------------------------------------------------------------------------
    def setup_caches(self, num_slots: int, max_len: int) -> None:
        """Allocate every layer's KV cache once: num_slots sequences of up to max_len tokens."""
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        w = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(num_slots, cfg.num_key_value_heads, max_len, cfg.dim_per_head, w.dtype, w.device)
        self.num_slots, self.max_len = num_slots, max_len

    # -- forwards -----------------------------------------------------------------------------
    def _run_layers(self, x, layer_ids, rope_pos, batch):
        cos, sin = rope_cos_sin(rope_pos, self.config.dim_per_head, self.config.rope_theta, x.dtype)
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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
