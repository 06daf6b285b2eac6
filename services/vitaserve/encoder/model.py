"""The WhisperVQ encoder of GLM-4-Voice: log-mel frames -> 12.5 Hz codebook ids.

A Whisper encoder cut at the quantizer: two convolutions (causal, left padding only, in the released
config), sinusoid-initialised positions, pre-norm transformer layers with block-causal attention
(blocks of `quantize_causal_block_size` frames see themselves and every earlier block), a pooling
layer, and a nearest-row lookup in a 16384-row codebook. Attribute names equal the released
state_dict keys, so model.safetensors loads with strict=True; inference only (no dropout, no EMA
codebook updates: the EMA buffers are kept only because the released file holds them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitaserve.encoder.config import WhisperVQConfig

_ACTIVATIONS = {
    "gelu": F.gelu,  # transformers' "gelu" is the exact erf form
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads dilation*(kernel-1) zeros on the left only, so frame t never sees t+1.

    The official class ignores the `padding` argument it is given; so does this one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.left_padding = self.dilation[0] * (kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_padding, 0)))


class WhisperVQAttention(nn.Module):
    """Whisper self-attention (k_proj has no bias), computed with SDPA as the official code does."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and t > 1)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class WhisperVQEncoderLayer(nn.Module):
    """Pre-norm Whisper encoder layer. A causal layer ignores the mask (plain causal SDPA), as upstream."""

    def __init__(self, config: WhisperVQConfig, is_causal: bool):
        super().__init__()
        d = config.d_model
        self.is_causal = is_causal
        self.self_attn = WhisperVQAttention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation = _ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), None if self.is_causal else mask, self.is_causal)
        return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))


def attention_bias(valid: torch.Tensor, block_size: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask: 0 where a query may look, finfo.min where it may not.

    With `block_size`, query i sees key j iff j is a valid frame and block(j) <= block(i) (the
    official tril | block_diag mask); without, it sees every valid frame. Shape (B, 1, L or 1, L).
    """
    allowed = valid[:, None, None, :].bool()
    if block_size is not None:
        block = torch.arange(valid.shape[1], device=valid.device) // block_size
        allowed = allowed & (block[None, :] <= block[:, None])[None, None]
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's position table (sin half, cos half); the official init for embed_positions."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class WhisperVQEncoder(nn.Module):
    def __init__(self, config: WhisperVQConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        conv = (
            CausalConv1d
            if config.encoder_causal_convolution
            else lambda i, o, k, stride=1: nn.Conv1d(i, o, k, stride=stride, padding=1)
        )
        self.conv1 = conv(config.num_mel_bins, d, 3)
        self.conv2 = conv(d, d, 3, stride=2)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(
            WhisperVQEncoderLayer(config, config.layer_is_causal(i)) for i in range(config.num_layers)
        )
        if not config.quantize_encoder_only:
            self.layer_norm = nn.LayerNorm(d)  # after the last layer: never reached by the tokenizer
        if config.pooling_kernel_size is not None:
            pool = nn.AvgPool1d if config.pooling_type == "avg" else nn.MaxPool1d
            self.pooling_layer = pool(kernel_size=config.pooling_kernel_size)
        self.codebook = nn.Embedding(config.quantize_vocab_size, d)
        # positions re-added after the quantizer (used by the layers above it, kept for strict loading)
        self.embed_positions2 = nn.Embedding(math.ceil(config.max_source_positions / config.pooling), d)
        if config.quantize_ema_decay is not None:
            self.register_buffer("ema_count", torch.ones(config.quantize_vocab_size))
            self.register_buffer("ema_weight", torch.zeros(config.quantize_vocab_size, d))
        self._codebook_sqr: torch.Tensor | None = None

    def refresh_codebook_cache(self) -> None:
        """|c|^2 per codebook row, computed once (call again after changing the codebook)."""
        self._codebook_sqr = torch.sum(self.codebook.weight.detach() ** 2, dim=1)

    def quantize(self, hidden: torch.Tensor) -> torch.Tensor:
        """Nearest codebook row by |c|^2 + |x|^2 - 2 x.c, the official expression and operation order."""
        if self._codebook_sqr is None or self._codebook_sqr.device != hidden.device:
            self.refresh_codebook_cache()
        flat = hidden.reshape(-1, hidden.shape[-1])
        inputs_sqr = torch.sum(flat**2, dim=1, keepdim=True)
        distances = torch.addmm(self._codebook_sqr + inputs_sqr, flat, self.codebook.weight.t(), alpha=-2.0, beta=1.0)
        return torch.min(distances, dim=1).indices.view(hidden.shape[:2])

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, num_mel_bins, T) and frame_mask (B, T), T a multiple of frames_per_token.

        Returns token ids (B, T // frames_per_token) and their validity mask (a token is valid when
        its first mel frame is, as the official extract_speech_token slices it).
        """
        cfg = self.config
        if features.shape[-1] % cfg.frames_per_token:
            raise ValueError(f"frame count {features.shape[-1]} is not a multiple of {cfg.frames_per_token}")
        mask = frame_mask[:, ::2]
        length = mask.shape[1]
        if length > cfg.max_source_positions:
            raise ValueError(f"{length} encoder frames exceed max_source_positions {cfg.max_source_positions}")
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[:length]
        block = cfg.quantize_causal_block_size
        bias = attention_bias(mask, block, x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, bias)
            if index + 1 == cfg.pooling_position and cfg.pooling_kernel_size is not None:
                k = cfg.pooling_kernel_size
                x = x.transpose(1, 2)
                if x.shape[-1] % k:
                    x = F.pad(x, (0, k - x.shape[-1] % k))
                x = self.pooling_layer(x).transpose(1, 2)
                mask = mask[:, ::k]
                bias = attention_bias(mask, None if block is None else block // k, x.dtype)
            if index + 1 == cfg.quantize_position:
                return self.quantize(x), mask.bool()
        raise AssertionError("unreachable: config.validate() bounds quantize_position")
