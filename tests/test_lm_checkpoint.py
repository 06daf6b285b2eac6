"""Checkpoint format: strict loading, clear errors, dtypes, and HF-equivalent token selection."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.common.weight_files import weight_files
from vitaserve.generator.loader import load_lm
from vitaserve.generator.sampling import apply_repetition_penalty, warp
from vitaserve.lmtext.sampling_params import SamplingParams


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tiny_checkpoint_is_official_layout(tiny_lm_dir):
    cfg = json.loads((tiny_lm_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_mtp" and cfg["architectures"] == ["Qwen2MTPForCausalLM"]
    assert cfg["num_hidden_layers"] == 12 and cfg["num_nextn_predict_layers"] == 10
    index = json.loads((tiny_lm_dir / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight", "mtp_projs.9.weight",
            "mtp_embed_norms.0.weight", "mtp_hidden_norms.0.weight", "model.layers.11.self_attn.q_proj.bias",
            "model.layers.2.mlp.gate_proj.weight"} <= keys
    assert not any("rotary" in k for k in keys)
    gen = json.loads((tiny_lm_dir / "generation_config.json").read_text())
    assert gen["mtp_inference_mode"] == [1, 4, 3, 8, 4, 10] and gen["repetition_penalty"] == 1.05


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_strict_load_in_each_dtype(tiny_lm_dir, dtype):
    model = load_lm(tiny_lm_dir, dtype=dtype)
    assert model.lm_head.weight.dtype == getattr(torch, dtype)
    assert model.mtp_projs[3].weight.shape == (64, 128)


def test_missing_key_is_named(tiny_lm_dir, tmp_path):
    ck = copy_ckpt(tiny_lm_dir, tmp_path / "ck")
    (shard,) = weight_files(ck)
    state = load_file(shard)
    del state["mtp_projs.4.weight"]
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=r"missing keys: mtp_projs\.4\.weight"):
        load_lm(ck)


def test_misshaped_and_unexpected_keys_are_named(tiny_lm_dir, tmp_path):
    ck = copy_ckpt(tiny_lm_dir, tmp_path / "ck")
    (shard,) = weight_files(ck)
    state = load_file(shard)
    state["model.norm.weight"] = torch.ones(65)
    state["extra.weight"] = torch.ones(2)
    save_file(state, str(shard))
    with pytest.raises(CheckpointError) as err:
        load_lm(ck)
    assert "model.norm.weight (file [65], model [64])" in str(err.value)
    assert "unexpected keys: extra.weight" in str(err.value)


def test_truncated_checkpoint_missing_shard(tiny_lm_dir, tmp_path):
    ck = copy_ckpt(tiny_lm_dir, tmp_path / "ck")
    for f in ck.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load_lm(ck)


def test_config_mismatch_reports_shapes(tiny_lm_dir, tmp_path):
    ck = copy_ckpt(tiny_lm_dir, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_hidden_layers"] = 13  # claims one more layer than the weights hold
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.12\."):
        load_lm(ck)


def test_wrong_model_type(tiny_lm_dir, tmp_path):
    ck = copy_ckpt(tiny_lm_dir, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_lm(ck)


def test_token_selection_matches_transformers_processors():
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=gen) * 3
    seen = torch.tensor([[3, 7, 7, 499, 0, 250]])
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    want = RepetitionPenaltyLogitsProcessor(1.05)(seen, logits.clone())
    got = apply_repetition_penalty(logits[0].clone(), seen[0], 1.05)
    torch.testing.assert_close(got, want[0])
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        want = proc(seen, want)
    torch.testing.assert_close(warp(got, params), want[0])


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validated()
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0).validated()


def test_7b_preset_has_the_released_shapes():
    """The 7b preset is never written in CI; its config and module shapes are checked on the meta device."""
    from vitaserve.generator.checkpoint import config_dict
    from vitaserve.lmtext.config import LMConfig
    from vitaserve.generator.model import VitaAudioLM

    raw = config_dict("7b")
    assert {k: raw[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                "num_hidden_layers", "num_nextn_predict_layers", "vocab_size", "rope_theta",
                                "bos_token_id", "eos_token_id")} == {
        "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
        "num_hidden_layers": 38, "num_nextn_predict_layers": 10, "vocab_size": 168072, "rope_theta": 1e6,
        "bos_token_id": 151643, "eos_token_id": 151645}
    with torch.device("meta"):
        model = VitaAudioLM(LMConfig.from_dict(raw))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["mtp_projs.0.weight"] == (3584, 7168)
    assert shapes["model.layers.37.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["lm_head.weight"] == (168072, 3584)
    assert "model.layers.38.mlp.up_proj.weight" not in shapes


def test_mini_preset_is_the_228m_benchmark_shape():
    from vitaserve.generator.checkpoint import config_dict
    from vitaserve.lmtext.config import LMConfig
    from vitaserve.generator.model import VitaAudioLM

    with torch.device("meta"):
        model = VitaAudioLM(LMConfig.from_dict(config_dict("mini")))
    n = sum(p.numel() for p in model.parameters())
    assert 220e6 < n < 236e6


def test_generate_cli_prints_json(tiny_lm_dir, capsys):
    from vitaserve.cli.main import main

    assert main(["generate", "--lm", str(tiny_lm_dir), "--prompt-ids", "1,2,3", "--mode", "turbo", "--greedy",
                 "--max-new-tokens", "12", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kinds"] == "M" + "m" * 10 + "M" and len(out["tokens"]) == 12 == len(out["token_ms"])
    assert out["first_chunk_ms"] == out["token_ms"][10]
    assert main(["generate", "--lm", str(tiny_lm_dir), "--prompt-ids", "1,2", "--mode", "1,11"]) == 2
    assert "MCTP modules" in capsys.readouterr().err
