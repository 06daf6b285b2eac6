"""Configuration of the GLM-4-Voice speech tokenizer, read from the checkpoint's own config.json.

The released folder (THUDM/glm-4-voice-tokenizer) stores a `WhisperVQConfig`: a transformers
`WhisperConfig` plus pooling / quantizer fields. `WhisperVQConfig` here keeps the fields that decide
the encoder's shapes and outputs; `raw` keeps the whole file so that a written checkpoint carries the
released key set. Missing keys take the defaults of the official classes (transformers'
`WhisperConfig`, GLM-4-Voice's `WhisperVQConfig`), as `from_pretrained` would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vitaserve.common.checkpoint_errors import CheckpointError


# Defaults of transformers.WhisperConfig (whisper-tiny sizes) and of GLM-4-Voice's WhisperVQConfig.
_DEFAULTS = {
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "activation_function": "gelu",
    "pooling_kernel_size": None,
    "pooling_type": "max",
    "pooling_position": 0,
    "quantize_vocab_size": None,
    "quantize_position": 16,
    "quantize_ema_decay": None,
    "quantize_encoder_only": False,
    "quantize_causal_encoder": False,
    "quantize_causal_block_size": None,
    "encoder_causal_attention": False,
    "encoder_causal_convolution": False,
}


@dataclass(frozen=True)
class WhisperVQConfig:
    num_mel_bins: int  # 128 released (Whisper-large-v3 front end)
    d_model: int  # 1280 released; also the codebook dimension
    encoder_layers: int  # 32 released, but only the first quantize_position are stored and run
    encoder_attention_heads: int
    encoder_ffn_dim: int
    max_source_positions: int  # 1500 frames after conv2 = one 30 s window
    activation_function: str
    pooling_kernel_size: int | None  # 4 released: 50 Hz frames -> 12.5 Hz tokens
    pooling_type: str  # "avg" released
    pooling_position: int  # pool after this many layers (16 released; 0 = never)
    quantize_vocab_size: int | None  # 16384 codebook rows
    quantize_position: int  # quantize after this many layers (16 released)
    quantize_ema_decay: float | None  # set -> the checkpoint also holds ema_count / ema_weight buffers
    quantize_encoder_only: bool  # True released: only the layers before the quantizer exist
    quantize_causal_encoder: bool
    quantize_causal_block_size: int | None  # 200 released: block-causal attention, 4 s blocks
    encoder_causal_attention: bool
    encoder_causal_convolution: bool  # True released: conv1/conv2 pad on the left only
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived facts the forward pass needs ----
    @property
    def num_layers(self) -> int:
        """Encoder layers the module owns (what the state_dict holds)."""
        return self.quantize_position if self.quantize_encoder_only else self.encoder_layers

    def layer_is_causal(self, index: int) -> bool:
        """Official rule: causal layers use plain causal SDPA and ignore the padding/block mask."""
        if self.encoder_causal_attention:
            return True
        if self.quantize_encoder_only:
            return self.quantize_causal_encoder
        return self.quantize_causal_encoder and index < self.quantize_position

    @property
    def pooling(self) -> int:
        return self.pooling_kernel_size or 1

    @property
    def frames_per_token(self) -> int:
        """Mel frames per output token: conv strides 1*2 times pooling 4 -> 8 (8 * hop 160 = 1280 samples)."""
        return 2 * self.pooling

    @classmethod
    def from_dict(cls, raw: dict) -> "WhisperVQConfig":
        values = {k: raw.get(k, default) for k, default in _DEFAULTS.items()}
        cfg = cls(**values, raw=dict(raw))
        cfg.validate()
        return cfg

    @classmethod
    def from_folder(cls, folder: str | Path) -> "WhisperVQConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw)

    def validate(self) -> None:
        if not self.quantize_vocab_size:
            raise CheckpointError("config.json has no quantize_vocab_size: this is not a speech tokenizer")
        if self.d_model % self.encoder_attention_heads:
            raise CheckpointError(
                f"config.json: d_model {self.d_model} is not divisible by encoder_attention_heads "
                f"{self.encoder_attention_heads}"
            )
        if not 1 <= self.quantize_position <= self.num_layers:
            raise CheckpointError(
                f"config.json: quantize_position {self.quantize_position} is outside 1..{self.num_layers}"
            )
        if self.pooling_kernel_size is not None:
            if self.pooling_type not in ("max", "avg"):
                raise CheckpointError(f"config.json: pooling_type {self.pooling_type!r} is not 'max' or 'avg'")
            if not 1 <= self.pooling_position <= self.quantize_position:
                # the official encoder would never pool, and its token mask would not line up
                raise CheckpointError(
                    f"config.json: pooling_position {self.pooling_position} is outside 1..quantize_position"
                )
        if self.activation_function not in ("gelu", "relu", "gelu_new"):
            raise CheckpointError(f"config.json: activation_function {self.activation_function!r} is not supported")
