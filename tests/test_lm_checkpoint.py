"""Checkpoint format: strict loading, clear errors, dtypes, and HF-equivalent token selection."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitaserve.generator.config import CheckpointError
from vitaserve.generator.loader import load_lm, weight_files
from vitaserve.generator.sampling import SamplingParams, apply_repetition_penalty, warp


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
