"""Read and write GLM-4-Voice tokenizer folders in the released layout.

The released THUDM/glm-4-voice-tokenizer folder holds config.json (a WhisperVQConfig with
quantize_encoder_only true), preprocessor_config.json (the Whisper-large-v3 feature extractor,
128 mel bins) and model.safetensors whose keys are the encoder's own names without prefix:
conv1/conv2, embed_positions, layers.0-15, codebook, embed_positions2 and the EMA buffers
ema_count / ema_weight (1,458,374,480 bytes in fp32). Loading is strict: a missing, unexpected or
mis-shaped key raises `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitaserve.common.audio_facts import AUDIO_CODEBOOK_SIZE, TOKENIZER_RATE
from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.common.state_dict import check_shapes, shapes_of
from vitaserve.common.weight_files import read_safetensors, safetensors_shapes, weight_files
from vitaserve.encoder.config import WhisperVQConfig
from vitaserve.encoder.model import WhisperVQEncoder, sinusoids

# config.json of the released folder, key for key (THUDM/glm-4-voice-tokenizer, transformers 4.44.1).
RELEASED_CONFIG: dict = {
    "_name_or_path": "THUDM/glm-4-voice-tokenizer",
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "apply_spec_augment": False,
    "architectures": ["WhisperVQEncoder"],
    "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50257],
    "bos_token_id": 50257,
    "classifier_proj_size": 256,
    "d_model": 1280,
    "decoder_attention_heads": 20,
    "decoder_ffn_dim": 5120,
    "decoder_layerdrop": 0.0,
    "decoder_layers": 32,
    "decoder_start_token_id": 50258,
    "dropout": 0.0,
    "encoder_attention_heads": 20,
    "encoder_causal_attention": False,
    "encoder_causal_convolution": True,
    "encoder_ffn_dim": 5120,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 32,
    "eos_token_id": 50257,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "max_length": 448,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "median_filter_width": 7,
    "model_type": "whisper",
    "num_hidden_layers": 32,
    "num_mel_bins": 128,
    "pad_token_id": 50256,
    "pooling_kernel_size": 4,
    "pooling_position": 16,
    "pooling_type": "avg",
    "quantize_causal_block_size": 200,
    "quantize_causal_encoder": False,
    "quantize_commit_coefficient": 0.25,
    "quantize_ema_decay": 0.99,
    "quantize_encoder_only": True,
    "quantize_loss_scale": 10.0,
    "quantize_position": 16,
    "quantize_restart_interval": 100,
    "quantize_vocab_size": AUDIO_CODEBOOK_SIZE,
    "scale_embedding": False,
    "skip_language_detection": True,
    "torch_dtype": "float32",
    "transformers_version": "4.44.1",
    "use_cache": True,
    "use_weighted_layer_sum": False,
    "vocab_size": 51866,
}

# preprocessor_config.json of the released folder: Whisper-large-v3's (128 mel bins, 16 kHz, hop 160).
RELEASED_PREPROCESSOR: dict = {
    "chunk_length": 30,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "WhisperProcessor",
    "return_attention_mask": False,
    "sampling_rate": TOKENIZER_RATE,
}

# tiny: a few MB for tests, same layout and front end; the codebook keeps its 16384 rows so that
# ids span the real range (its dimension is d_model, as in the official module).
PRESETS: dict[str, dict] = {
    "released": {},
    "tiny": {
        "_name_or_path": "vitaserve/glm-4-voice-tokenizer-tiny",
        "d_model": 64,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 256,
        "encoder_layers": 4,
        "num_hidden_layers": 4,
        "decoder_attention_heads": 4,
        "decoder_ffn_dim": 256,
        "decoder_layers": 4,
        "pooling_position": 2,
        "quantize_position": 2,
    },
}


def load_encoder(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WhisperVQEncoder:
    """Build the encoder from folder/config.json and load its weights with strict key/shape checks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config = WhisperVQConfig.from_folder(folder)
    with torch.device("meta"):
        model = WhisperVQEncoder(config)
    files = weight_files(folder)
    check_shapes(shapes_of(model.state_dict()), safetensors_shapes(files), str(folder), "config.json")
    model.load_state_dict(read_safetensors(files), strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    model.refresh_codebook_cache()
    return model


def _random_state(model: WhisperVQEncoder, std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights that make a random tokenizer follow its input.

    The official _init_weights (N(0, init_std=0.02) everywhere) lets the sinusoid positions swamp the
    convolution output, so a random-weight tokenizer emits nearly the same ids for any audio. Here
    matrices are N(0, 1/fan_in) (convolutions x3), which makes the ids depend on the audio and so
    gives tests something to check. Biases 0, LayerNorms 1, codebook N(0, init_std), sinusoid
    positions, embed_positions2 = the first rows of embed_positions, ema_weight = codebook, as upstream.
    """
    cfg = model.config
    state = {}
    for key, ref in model.state_dict().items():
        if key.endswith("layer_norm.weight") or key == "ema_count":
            value = torch.ones(ref.shape)
        elif key.endswith(".bias"):
            value = torch.zeros(ref.shape)
        elif ref.dim() >= 2 and not key.startswith(("codebook", "embed_positions", "ema_")):
            fan_in = math.prod(ref.shape[1:])
            gain = 3.0 if key.startswith("conv") else 1.0
            value = torch.empty(ref.shape).normal_(0.0, gain / math.sqrt(fan_in), generator=generator)
        else:
            value = torch.empty(ref.shape).normal_(0.0, std, generator=generator)
        state[key] = value
    state["embed_positions.weight"] = sinusoids(cfg.max_source_positions, cfg.d_model)
    rows = math.ceil(cfg.max_source_positions / cfg.pooling)
    state["embed_positions2.weight"] = state["embed_positions.weight"][:rows].clone()
    if "ema_weight" in state:
        state["ema_weight"] = state["codebook.weight"].clone()
    return state


def write_tokenizer_checkpoint(out_dir: Path, preset: str, seed: int = 0) -> Path:
    """Write a random-weight tokenizer folder laid out like the released one; returns the folder."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {**RELEASED_CONFIG, **PRESETS[preset]}
    config = WhisperVQConfig.from_dict(raw)
    with torch.device("meta"):
        model = WhisperVQEncoder(config)
    generator = torch.Generator().manual_seed(seed)
    state = _random_state(model, raw["init_std"], generator)
    weights = out_dir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; the folder is meant to be shared like a download
    # transformers' to_json_string layout: indent 2, sorted keys, trailing newline
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(RELEASED_PREPROCESSOR, indent=2, sort_keys=True) + "\n")
    return out_dir
