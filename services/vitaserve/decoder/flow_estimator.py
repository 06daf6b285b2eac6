"""The flow-matching velocity estimator: CosyVoice's ConditionalDecoder (a 1-D U-Net of Matcha-TTS
ResNet blocks and diffusers-style transformer blocks).

Input channels are [x, mu, speaker, prompt-mel condition] stacked (4 x 80); the time step enters every
ResNet block through `time_mlp`. Attribute names follow the official modules so flow.pt loads with
strict=True: time_mlp.linear_{1,2}; {down,mid,up}_blocks.{i}.0 (ResnetBlock1D: mlp.1,
block{1,2}.block.{0,1}, res_conv); .1.{j} (BasicTransformerBlock: norm1, attn1.to_{q,k,v},
attn1.to_out.0, norm3, ff.net.0.proj, ff.net.2); .2 (down/up sampling); final_block; final_proj.

Exactness notes (diffusers 0.27 as the official code pins it): the attention mask is the FLOAT
product mask^T mask, which diffusers passes to SDPA as an ADDITIVE mask (ones, not -inf), so with no
padding it shifts every score by +1. We pass the same additive mask, so results match bit for bit
(padding, which batch-1 inference never has, is masked as weakly as officially: +0 instead of +1).
Dropout layers are absent: the modules always run as in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitaserve.decoder.flow_config import EstimatorConfig


def timestep_features(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Matcha's SinusoidalPosEmb: [N] (or scalar) time -> [N, dim] (sin half, cos half)."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    emb = scale * t.unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Block1D(nn.Module):
    """conv3 -> GroupNorm(8) -> Mish on the masked input; output masked."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:  # no padding: multiplying by ones is exact, so skipping it is too
            return self.block(x)
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask)
        h += self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(_masked(x, mask))


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class Downsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """diffusers `Attention` as BasicTransformerBlock builds it: no q/k/v bias, heads x dim_head inner
    width (512 for 256 channels in the released model), output projection with bias."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, C]; bias [B or 1, 1, T, T] additive."""
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.to_k(x).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.to_v(x).view(b, t, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(b, self.heads, t, t))
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, act_fn: str, mult: int = 4):
        super().__init__()
        approximate = "tanh" if act_fn == "gelu-approximate" else "none"
        # net.1 is the official (parameterless) Dropout
        self.net = nn.ModuleList([GELUProj(dim, dim * mult, approximate), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, act_fn)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


def _transformers(cfg: EstimatorConfig, dim: int) -> nn.ModuleList:
    return nn.ModuleList(
        BasicTransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim, cfg.act_fn) for _ in range(cfg.n_blocks)
    )


class ConditionalDecoder(nn.Module):
    def __init__(self, cfg: EstimatorConfig):
        super().__init__()
        self.cfg = cfg
        channels = tuple(cfg.channels)
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cfg.in_channels, time_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Downsample1D(out_ch)
            resnet = ResnetBlock1D(in_ch, out_ch, time_dim)
            self.down_blocks.append(nn.ModuleList([resnet, _transformers(cfg, out_ch), down]))

        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], out_ch, time_dim), _transformers(cfg, out_ch)])
            for _ in range(cfg.num_mid_blocks)
        )

        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            in_ch, out_ch = up_channels[i] * 2, up_channels[i + 1]
            last = i == len(up_channels) - 2
            up = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Upsample1D(out_ch)
            resnet = ResnetBlock1D(in_ch, out_ch, time_dim)
            self.up_blocks.append(nn.ModuleList([resnet, _transformers(cfg, out_ch), up]))

        self.final_block = Block1D(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], cfg.out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: Kaiming-normal convs and linears, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """[1, time_dim] for a scalar t; shared by every row of a batch (CFG's two branches)."""
        features = timestep_features(t, self.cfg.in_channels)  # float32, as officially
        return self.time_mlp(features.to(self.time_mlp.linear_1.weight.dtype))

    @staticmethod
    def level_masks(mask: torch.Tensor, levels: int) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """For each U-Net level: (frame mask [B,1,T_l], or None when nothing is padded; additive
        attention bias [B,1,T_l,T_l]). Independent of x and t: one ODE solve computes them once."""
        full = bool(mask.min() == 1)
        out = []
        for _ in range(levels):
            out.append((None if full else mask, torch.matmul(mask.transpose(1, 2), mask).unsqueeze(1)))
            mask = mask[:, :, ::2]
        return out

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        spks: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        *,
        time_emb: torch.Tensor | None = None,
        levels: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Official signature estimator(x, mask, mu, t, spks, cond) -> velocity [B, 80, T].

        With mu None, x is already the stacked [x, mu, spks, cond] input (the CFM solver stacks the
        constant part once); time_emb / levels may be passed precomputed."""
        if time_emb is None:
            time_emb = self.time_embedding(t)
        if mu is not None:
            parts = [x, mu]
            if spks is not None:
                parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            if cond is not None:
                parts.append(cond)
            x = torch.cat(parts, dim=1)
        if levels is None:
            levels = self.level_masks(mask, len(self.down_blocks))

        skips = []
        for (resnet, blocks, down), (m, bias) in zip(self.down_blocks, levels):
            x = self._transform(resnet(x, m, time_emb), blocks, bias)
            skips.append(x)
            x = down(_masked(x, m))
        m_mid, bias_mid = levels[-1]
        for resnet, blocks in self.mid_blocks:
            x = self._transform(resnet(x, m_mid, time_emb), blocks, bias_mid)
        for (resnet, blocks, up), (m, bias) in zip(self.up_blocks, reversed(levels)):
            skip = skips.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = up(_masked(self._transform(resnet(x, m, time_emb), blocks, bias), m))
        x = self.final_block(x, m)
        return _masked(self.final_proj(_masked(x, m)), levels[0][0])

    @staticmethod
    def _transform(x: torch.Tensor, blocks: nn.ModuleList, bias: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2).contiguous()  # [B, T, C]
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2).contiguous()
