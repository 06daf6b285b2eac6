"""Configuration of the VITA-Audio language model, read from the checkpoint's own files.

`LMConfig` mirrors the keys of the released config.json (model_type qwen2_mtp); `GenerationDefaults`
mirrors generation_config.json. Both are built once at load time and passed down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vitaserve.common.checkpoint_errors import CheckpointError


@dataclass(frozen=True)
class LMConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int  # 38 released: 28 backbone + 10 MCTP layers
    num_nextn_predict_layers: int  # MCTP modules; their decoder layers are the last ones
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None

    @property
    def num_backbone_layers(self) -> int:
        return self.num_hidden_layers - self.num_nextn_predict_layers

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def mtp_layer_index(self, module: int) -> int:
        """model.layers index of MCTP module `module` (28 + i in the released checkpoint)."""
        return self.num_backbone_layers + module

    @classmethod
    def from_dict(cls, raw: dict) -> "LMConfig":
        model_type = raw.get("model_type")
        if model_type not in ("qwen2_mtp", "qwen2"):
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; expected 'qwen2_mtp' (VITA-Audio) or 'qwen2'"
            )
        if raw.get("use_sliding_window"):
            raise CheckpointError("config.json enables use_sliding_window, which VITA-Audio never uses")
        required = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        missing = [k for k in required if k not in raw]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}")
        cfg = cls(
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            num_hidden_layers=raw["num_hidden_layers"],
            num_nextn_predict_layers=raw.get("num_nextn_predict_layers", 0),
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 1_000_000.0),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            torch_dtype=raw.get("torch_dtype", "bfloat16"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            head_dim=raw.get("head_dim"),
        )
        if cfg.num_nextn_predict_layers >= cfg.num_hidden_layers:
            raise CheckpointError("num_nextn_predict_layers must be smaller than num_hidden_layers")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        return cfg

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LMConfig":
        return cls.from_dict(_read_json(Path(folder) / "config.json"))


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: the sampling settings and schedule the checkpoint ships with."""

    eos_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    mtp_inference_mode: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> "GenerationDefaults":
        eos = raw.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        mode = raw.get("mtp_inference_mode")
        return cls(
            eos_token_ids=tuple(eos),
            do_sample=bool(raw.get("do_sample", False)),
            temperature=float(raw.get("temperature", 1.0)),
            top_k=int(raw.get("top_k", 0) or 0),
            top_p=float(raw.get("top_p", 1.0)),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
            mtp_inference_mode=tuple(mode) if mode else None,
            pad_token_id=raw.get("pad_token_id"),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "GenerationDefaults":
        path = Path(folder) / "generation_config.json"
        return cls.from_dict(_read_json(path)) if path.exists() else cls()


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
