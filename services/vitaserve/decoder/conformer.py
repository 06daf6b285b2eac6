"""The flow's token encoder: CosyVoice's BlockConformerEncoder as GLM-4-Voice configures it.

Linear input layer (Linear + LayerNorm, x * sqrt(d)), ESPnet relative positions, and `num_blocks`
pre-norm layers of block-relative self-attention + feed-forward (no conv module, no macaron). The
attention mask is block-causal: position i sees every key up to the end of its own block of
`block_size` tokens. So the encoder output of the first k * block_size tokens never changes when
later tokens are appended, which is what lets the decoder start from one block (10 tokens).

Attribute names follow the official modules so flow.pt loads with strict=True:
embed.out.{0,1}, encoders.{i}.self_attn.{linear_q,k,v,out,pos, pos_bias_u, pos_bias_v},
encoders.{i}.feed_forward.{w_1,w_2}, encoders.{i}.norm_{mha,ff}, after_norm.
Dropout layers are absent: the modules always run as in eval mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitaserve.decoder.flow_config import EncoderConfig

_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def block_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """[length, length] bool: query i sees key j iff j < (i // block_size + 1) * block_size."""
    pos = torch.arange(length, device=device)
    block_end = (pos // block_size + 1) * block_size
    return pos[None, :] < block_end[:, None]


class RelPositionTable:
    """ESPnet relative positional encodings (no weights). Row r of `table(T)` encodes the relative
    position T - 1 - r, i.e. from +(T-1) down to -(T-1). Values are computed exactly as the official
    `EspnetRelPositionalEncoding` does (a table of 5000 positions, extended when needed), so they are
    bit-identical for every length."""

    def __init__(self, d_model: int, max_len: int = 5000):
        self.d_model = d_model
        self.max_len = max_len
        self._pe: dict[tuple, torch.Tensor] = {}

    def _build(self, n: int) -> torch.Tensor:
        position = torch.arange(0, n, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / self.d_model)
        )
        positive = torch.zeros(n, self.d_model)
        negative = torch.zeros(n, self.d_model)
        positive[:, 0::2] = torch.sin(position * div_term)
        positive[:, 1::2] = torch.cos(position * div_term)
        negative[:, 0::2] = torch.sin(-1 * position * div_term)
        negative[:, 1::2] = torch.cos(-1 * position * div_term)
        return torch.cat([torch.flip(positive, [0]), negative[1:]], dim=0)  # [2n - 1, d]

    def table(self, length: int, device, dtype) -> torch.Tensor:
        n = max(self.max_len, length)
        key = (n, str(device), dtype)
        if key not in self._pe:
            self._pe = {k: v for k, v in self._pe.items() if k[0] == n}  # drop outgrown tables
            self._pe[key] = self._build(n).to(device=device, dtype=dtype)
        pe = self._pe[key]
        center = pe.size(0) // 2
        return pe[center - length + 1 : center + length].unsqueeze(0)  # [1, 2T - 1, d]


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """[B, H, T, 2T-1] (keys indexed by relative position T-1-r) -> [B, H, T, T] indexed by key j.

    Entry (i, j) is taken from column T-1-i+j, the relative position i-j: a strided view, no copy."""
    b, h, t, w = scores.shape
    scores = scores.contiguous()
    return scores.as_strided((b, h, t, t), (h * t * w, t * w, w - 1, 1), scores.storage_offset() + t - 1)


class BlockRelPositionAttention(nn.Module):
    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; keep [B, T, T] bool (False = masked); pos_emb [1, 2T-1, D]."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)  # kept [B, T, H, dk] to add the biases
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        # Transformer-XL terms (a)+(c) with u and (b)+(d) with v; same op order as the official code.
        matrix_ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        matrix_bd = rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        masked = ~keep.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(masked, -float("inf")), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, idim: int, hidden: int, activation: str):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.activation = _ACTIVATIONS[activation]()
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm: x + attn(norm_mha(x)), then x + ff(norm_ff(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.output_size
        self.self_attn = BlockRelPositionAttention(cfg.attention_heads, d, cfg.key_bias)
        self.feed_forward = FeedForward(d, cfg.linear_units, cfg.activation_type)
        self.norm_ff = nn.LayerNorm(d, eps=1e-5)
        self.norm_mha = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), keep, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class LinearEmbed(nn.Module):
    """`input_layer: linear`: Linear + LayerNorm (the official `out` Sequential; its Dropout is index 2)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class BlockConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.embed = LinearEmbed(cfg.input_size, cfg.output_size)
        self.pos = RelPositionTable(cfg.output_size)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def output_size(self) -> int:
        return self.cfg.output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> torch.Tensor:
        """xs [B, T, input_size], xs_lens [B] -> [B, T, output_size] (padded rows are not zeroed)."""
        t = xs.size(1)
        valid = torch.arange(t, device=xs.device)[None, :] < xs_lens.to(xs.device)[:, None]  # [B, T]
        keep = valid[:, None, :] & block_mask(t, self.block_size, xs.device)[None]  # [B, T, T]
        x = self.embed(xs)
        pos_emb = self.pos.table(t, x.device, x.dtype)
        for layer in self.encoders:
            x = layer(x, keep, pos_emb)
        return self.after_norm(x)
