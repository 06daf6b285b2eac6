"""`make-checkpoint` for the language model: random weights in the official VITA-Audio folder format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from vitaserve.lmtext.config import LMConfig
from vitaserve.generator.loader import save_lm_weights
from vitaserve.generator.model import VitaAudioLM
from vitaserve.lmtext.schedule import MODES
from vitaserve.lmtext.text_tokenizer import build_text_tokenizer, write_tokenizer_files
from vitaserve.lmtext.vocab import QWEN_SPECIAL_TOKENS, AudioVocab

RELEASED_BASE = 151643  # id of <|endoftext|> in Qwen2.5

# (hidden, intermediate, heads, kv heads, backbone layers, MCTP modules, text base size, dtype)
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                 backbone=2, mtp=10, base=512, torch_dtype="float32"),
    # the 228 M-parameter CPU benchmark shape of DESIGN.md, with the real 168072-id vocabulary
    "mini": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                 backbone=8, mtp=10, base=RELEASED_BASE, torch_dtype="float32"),
    # the released Qwen2.5-7B + 10 MCTP shapes (config_7B_mtp10.json)
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               backbone=28, mtp=10, base=RELEASED_BASE, torch_dtype="bfloat16"),
}


def config_dict(preset: str) -> dict:
    p = PRESETS[preset]
    vocab = AudioVocab(p["base"])
    vocab_size = 168072 if p["base"] == RELEASED_BASE else -(-vocab.size // 8) * 8
    return {
        "num_nextn_predict_layers": p["mtp"],
        "architectures": ["Qwen2MTPForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab.endoftext_id,
        "eos_token_id": vocab.im_end_id,
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": 32768,
        "max_window_layers": p["backbone"],
        "model_type": "qwen2_mtp",
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["backbone"] + p["mtp"],
        "num_key_value_heads": p["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": p["torch_dtype"],
        "transformers_version": "4.48.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def generation_config_dict(vocab: AudioVocab) -> dict:
    """The released generation_config.json values, with this vocabulary's end ids."""
    return {
        "bos_token_id": vocab.endoftext_id,
        "do_sample": True,
        "eos_token_id": [vocab.im_end_id, vocab.endoftext_id],
        "mtp_inference_mode": list(MODES["balance"]),
        "pad_token_id": vocab.endoftext_id,
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": "4.48.3",
    }


@torch.no_grad()
def init_random_(model: VitaAudioLM, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) matrices and zero biases as Qwen2 initialises; norms stay at one."""
    gen = torch.Generator().manual_seed(seed)
    params = [(n, p) for n, p in model.named_parameters() if p.dim() > 1 or n.endswith(".bias")]
    for name, param in tqdm(params, desc="random weights", leave=False, disable=len(params) < 200):
        if name.endswith(".bias"):
            param.normal_(0.0, std, generator=gen)  # non-zero so the q/k/v biases are exercised
        else:
            param.normal_(0.0, std, generator=gen)


def write_lm_checkpoint(out_dir: str | Path, preset: str, seed: int = 0) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = config_dict(preset)
    cfg = LMConfig.from_dict(raw)
    vocab = AudioVocab(cfg.bos_token_id)
    dtype = torch.bfloat16 if raw["torch_dtype"] == "bfloat16" else torch.float32
    model = VitaAudioLM(cfg).to(dtype)
    init_random_(model, seed)
    save_lm_weights(model, out, max_shard_bytes=4 * 1024**3 if preset == "7b" else 512 * 1024**2)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config_dict(vocab), indent=2) + "\n")
    tok = build_text_tokenizer(PRESETS[preset]["base"])
    assert tok.token_to_id(QWEN_SPECIAL_TOKENS[0]) == vocab.endoftext_id
    write_tokenizer_files(tok, out)
    return out
