"""The GLM-4-Voice flow model (tokens -> mel): loading, the official frame rule, noise handling,
the block-causal encoder, the batched CFG solver, the HyperPyYAML config, and golden values taken
from the official code (GLM-4-Voice fork 54d6672, modules in eval mode) on the tiny preset."""

from __future__ import annotations

import math

import pytest
import torch

from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.decoder.flow import FlowModel, load_flow, random_flow_state_dict
from vitaserve.decoder.flow_config import FlowConfig
from vitaserve.decoder.yaml_config import (
    DecoderConfigError,
    decoder_yaml_for_preset,
    dump_decoder_yaml,
    load_decoder_yaml,
    parse_decoder_yaml,
)

SEED = 1


@pytest.fixture(scope="module")
def cfg() -> FlowConfig:
    return FlowConfig.from_yaml_dict(decoder_yaml_for_preset("tiny")["flow"])


@pytest.fixture(scope="module")
def state(cfg) -> dict:
    return random_flow_state_dict(cfg, SEED)


@pytest.fixture(scope="module")
def model(cfg, state) -> FlowModel:
    m = FlowModel(cfg)
    m.load_state_dict(state, strict=True)
    return m


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, state):
    d = tmp_path_factory.mktemp("decoder")
    dump_decoder_yaml(decoder_yaml_for_preset("tiny"), d / "config.yaml")
    torch.save(state, d / "flow.pt")
    return d


def tokens(n: int, mult: int = 647, add: int = 3) -> torch.Tensor:
    return ((torch.arange(n) * mult + add) % 16384).view(1, -1)


NO_PROMPT = (torch.zeros(1, 0, dtype=torch.long), 0, torch.zeros(1, 0, 80), 0)


def run(model, n_tok=12, steps=2, **kw) -> torch.Tensor:
    return model.inference(tokens(n_tok), n_tok, *NO_PROMPT, torch.zeros(1, 192), steps, **kw)


# ---------------------------------------------------------------------------------------- loading


def test_strict_load_round_trip(decoder_dir, model, state):
    loaded = load_flow(decoder_dir)
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    a = run(loaded, deterministic=True)
    b = run(model, deterministic=True)
    assert torch.equal(a, b)


def test_official_key_names(model):
    keys = model.state_dict().keys()
    for k in (
        "input_embedding.weight",
        "spk_embed_affine_layer.bias",
        "encoder.embed.out.1.weight",
        "encoder.encoders.1.self_attn.pos_bias_u",
        "encoder.encoders.0.self_attn.linear_pos.weight",
        "encoder.encoders.0.feed_forward.w_2.bias",
        "encoder.after_norm.weight",
        "encoder_proj.weight",
        "length_regulator.model.12.weight",
        "decoder.estimator.time_mlp.linear_2.weight",
        "decoder.estimator.down_blocks.0.0.block1.block.0.weight",
        "decoder.estimator.down_blocks.0.1.0.attn1.to_out.0.bias",
        "decoder.estimator.down_blocks.0.1.0.ff.net.0.proj.weight",
        "decoder.estimator.down_blocks.0.2.conv.weight",
        "decoder.estimator.down_blocks.1.2.weight",
        "decoder.estimator.mid_blocks.1.0.res_conv.weight",
        "decoder.estimator.up_blocks.0.2.conv.weight",
        "decoder.estimator.final_proj.bias",
    ):
        assert k in keys, k
    assert not any("pe" == k.split(".")[-1] for k in keys)  # positional tables are not weights


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, state):
    bad = dict(state)
    del bad["encoder_proj.bias"]
    bad["decoder.estimator.final_proj.weight"] = torch.zeros(3, 3, 1)
    bad["encoder.extra.weight"] = torch.zeros(1)
    dump_decoder_yaml(decoder_yaml_for_preset("tiny"), tmp_path / "config.yaml")
    torch.save(bad, tmp_path / "flow.pt")
    with pytest.raises(CheckpointError) as err:
        load_flow(tmp_path)
    msg = str(err.value)
    assert "missing keys: encoder_proj.bias" in msg
    assert "unexpected keys: encoder.extra.weight" in msg
    assert "decoder.estimator.final_proj.weight (file [3, 3, 1], model [80, 32, 1])" in msg


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(DecoderConfigError, match="config.yaml"):
        load_flow(tmp_path)
    dump_decoder_yaml(decoder_yaml_for_preset("tiny"), tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match="flow.pt"):
        load_flow(tmp_path)


def test_random_init_is_seeded_and_leaves_global_rng_alone(cfg, state):
    before = torch.get_rng_state()
    again = random_flow_state_dict(cfg, SEED)
    other = random_flow_state_dict(cfg, SEED + 1)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert not torch.equal(other["encoder_proj.weight"], state["encoder_proj.weight"])


# ------------------------------------------------------------------------------- official behaviour


def official_frames(n_tokens: int) -> int:
    return int(n_tokens / 12.5 * 22050 / 256)


@pytest.mark.parametrize("n_prompt,n_tok", [(0, 10), (0, 25), (10, 25), (30, 7)])
def test_output_frames_follow_the_official_rule(model, n_prompt, n_tok):
    n_feat = official_frames(n_prompt)
    mel = model.inference(
        tokens(n_tok), n_tok, tokens(n_prompt, 911, 7), n_prompt, torch.randn(1, n_feat, 80), n_feat,
        torch.randn(1, 192), 1, deterministic=True,
    )
    assert mel.shape == (1, 80, official_frames(n_prompt + n_tok) - n_feat)
    assert official_frames(25) == 172 and official_frames(35) - official_frames(10) == 173


def test_prompt_mel_longer_than_its_tokens_is_absorbed_and_too_long_is_refused(model):
    # The official streaming passes prompt mels that are not aligned with the prompt tokens.
    mel = model.inference(tokens(5), 5, tokens(10), 10, torch.randn(1, 80, 80), 80, torch.zeros(1, 192), 1,
                          deterministic=True)
    assert mel.shape == (1, 80, official_frames(15) - 80)
    with pytest.raises(ValueError, match="more than"):
        model.inference(tokens(1), 1, tokens(2), 2, torch.randn(1, 30, 80), 30, torch.zeros(1, 192), 1)


def test_golden_values_from_the_official_code(model):
    # Official MaskedDiffWithXvec.inference (eval mode, option_steps=4, its torch.manual_seed(42)
    # noise) on these weights and inputs: prompt mel deliberately shorter than the prompt tokens.
    feat = torch.sin(torch.arange(40 * 80, dtype=torch.float32) * 0.37).view(1, 40, 80)
    emb = torch.cos(torch.arange(192, dtype=torch.float32)).view(1, 192)
    mel = model.inference(tokens(20), 20, tokens(12, 911, 7), 12, feat, 40, emb, 4,
                          generator=torch.Generator().manual_seed(42))
    assert mel.shape == (1, 80, 180)
    assert mel.sum().item() == pytest.approx(-1143.7392578125, abs=2e-2)
    assert mel.abs().sum().item() == pytest.approx(15426.6201171875, abs=2e-2)
    expected = [
        -0.796313, 2.033144, 0.254196, 1.493787, 2.079418, 1.656697, -0.682384, 2.443317, -1.495968, 1.363705,
        -2.472908, -0.14308, 0.305494, 2.293878, -0.678998, 2.867589, -1.536971, -2.688344, 0.729337, -3.480894,
        -0.60148, -2.701542, 0.619712, -1.676439, 0.224311, 0.080354, -1.523951, -1.499568, 0.528171, -0.137824,
        1.159964, 2.119298, -0.938217, -0.893539, -1.484623, 0.636937, -0.071558, -1.044318, -2.261988, -0.834943,
    ]
    torch.testing.assert_close(mel[0, ::16, ::23].flatten(), torch.tensor(expected), atol=1e-4, rtol=0)

    mel0 = model.inference(tokens(20), 20, *NO_PROMPT, torch.zeros(1, 192), 4,
                           generator=torch.Generator().manual_seed(42))
    assert mel0.shape == (1, 80, 137)
    assert mel0.sum().item() == pytest.approx(-973.4960327148438, abs=2e-2)
    assert mel0.abs().sum().item() == pytest.approx(11708.1328125, abs=2e-2)


def test_batched_cfg_equals_the_plain_two_pass_euler_solver(model):
    """The solver stacks conditions once and runs both CFG branches as one batch; compare with the
    official loop: two estimator calls per step, the guidance branch on true zeros."""
    n_tok, steps = 15, 3
    emb = torch.randn(1, 192, generator=torch.Generator().manual_seed(3))
    fast = model.inference(tokens(n_tok), n_tok, *NO_PROMPT, emb, steps, deterministic=True)

    est, rate = model.decoder.estimator, model.cfg.cfm.inference_cfg_rate
    with torch.inference_mode():
        spks = model.spk_embed_affine_layer(torch.nn.functional.normalize(emb, dim=1))
        frames = official_frames(n_tok)
        mu = model.length_regulator(model.encode(tokens(n_tok)), frames).transpose(1, 2)
        mask, cond = torch.ones(1, 1, frames), torch.zeros(1, 80, frames)
        t_span = 1 - torch.cos(torch.linspace(0, 1, steps + 1) * 0.5 * math.pi)
        x = torch.zeros(1, 80, frames)
        for i in range(steps):
            t, dt = t_span[i], t_span[i + 1] - t_span[i]
            v = est(x, mask, mu, t, spks, cond)
            v0 = est(x, mask, torch.zeros_like(mu), t, torch.zeros_like(spks), torch.zeros_like(cond))
            x = x + dt * ((1 + rate) * v - rate * v0)
    torch.testing.assert_close(fast, x, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- noise


def test_deterministic_is_reproducible_and_differs_from_noise(model):
    a = run(model, deterministic=True)
    b = run(model, deterministic=True)
    assert torch.equal(a, b) and a.isfinite().all()
    noisy = run(model, generator=torch.Generator().manual_seed(42))
    assert not torch.allclose(a, noisy)


def test_generator_seeds_the_start_noise_without_touching_the_global_rng(model):
    before = torch.get_rng_state()
    a = run(model, generator=torch.Generator().manual_seed(42))
    b = run(model, generator=torch.Generator().manual_seed(42))
    c = run(model, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_random_weights_give_finite_bounded_mels(model):
    mel = run(model, n_tok=25, steps=10, generator=torch.Generator().manual_seed(42))
    assert mel.isfinite().all() and mel.abs().max() < 50


# ------------------------------------------------------------------------------ block attention


def test_encoder_blocks_do_not_see_later_tokens(model):
    """block_rel_selfattn: token i attends up to the end of its 10-token block. The first full block's
    encoding is final once it exists (decoding can start from 10 tokens); inside a block, attention
    is bidirectional, so a partial block still changes when its block fills up."""
    assert model.encoder.block_size == 10
    first = model.encode(tokens(10))
    longer = model.encode(tokens(27))
    torch.testing.assert_close(longer[:, :10], first, atol=1e-5, rtol=1e-5)
    partial = model.encode(tokens(7))
    filled = model.encode(tokens(10))
    assert (filled[:, :7] - partial).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- YAML

RELEASED_STYLE = """
__set_seed1: !apply:random.seed [1986]
sample_rate: 22050
spk_embed_dim: 192
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 512
    spk_embed_dim: !ref <spk_embed_dim>
    input_frame_rate: 12.5
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                inference_cfg_rate: 0.7
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    sampling_rate: !ref <sample_rate>
    istft_params:
        n_fft: 16
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
"""


def test_hyperpyyaml_tags_become_plain_dicts():
    cfg = parse_decoder_yaml(RELEASED_STYLE)
    assert cfg["__set_seed1"] == {"_apply": "random.seed", "_args": [1986]}
    flow = cfg["flow"]
    assert flow["_class"] == "cosyvoice.flow.flow.MaskedDiffWithXvec"
    assert flow["spk_embed_dim"] == 192 and cfg["hift"]["sampling_rate"] == 22050
    params = flow["decoder"]["cfm_params"]
    assert params["_class"] == "omegaconf.DictConfig"
    assert params["content"]["sigma_min"] == 1e-06 and isinstance(params["content"]["sigma_min"], float)
    assert cfg["hift"]["resblock_dilation_sizes"] == [[1, 3, 5], [1, 3, 5]]


def test_bad_references_and_tags_are_refused():
    with pytest.raises(DecoderConfigError, match="names no key"):
        parse_decoder_yaml("a: 1\nb: !ref <c>\n")
    with pytest.raises(DecoderConfigError, match="arithmetic"):
        parse_decoder_yaml("a: 1\nb: !ref <a> + 3\n")
    with pytest.raises(DecoderConfigError, match="not supported"):
        parse_decoder_yaml("a: !copy <b>\nb: 1\n")
    assert parse_decoder_yaml("d: out\nb: !ref <d>/ali\n")["b"] == "out/ali"


@pytest.mark.parametrize("preset", ["tiny", "released"])
def test_yaml_round_trip(tmp_path, preset):
    cfg = decoder_yaml_for_preset(preset)
    dump_decoder_yaml(cfg, tmp_path / "config.yaml")
    assert load_decoder_yaml(tmp_path / "config.yaml") == cfg
    text = (tmp_path / "config.yaml").read_text()
    assert "flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec" in text
    assert "spk_embed_dim: !ref" in text  # written as the released file writes it
    assert [k for k in cfg if not k.startswith("__")][:2] == ["sample_rate", "text_encoder_input_size"]


def test_presets_carry_the_released_values():
    rel = decoder_yaml_for_preset("released")
    flow = FlowConfig.from_yaml_dict(rel["flow"])
    assert flow.encoder.block_size == 10 and flow.encoder.num_blocks == 6 and flow.vocab_size == 16384
    assert flow.cfm.inference_cfg_rate == 0.7 and flow.cfm.t_scheduler == "cosine"
    assert flow.estimator.channels == (256, 256) and flow.estimator.num_mid_blocks == 12
    hift = rel["hift"]
    assert hift["istft_params"] == {"n_fft": 16, "hop_len": 4} and hift["base_channels"] == 512
    assert hift["f0_predictor"]["cond_channels"] == 512 and hift["audio_limit"] == 0.99
    tiny = decoder_yaml_for_preset("tiny")
    assert tiny["hift"]["base_channels"] < 512 and tiny["hift"]["f0_predictor"]["cond_channels"] < 512
    assert tiny["hift"]["upsample_rates"] == hift["upsample_rates"]
    with pytest.raises(ValueError, match="unknown decoder preset"):
        decoder_yaml_for_preset("huge")


def test_unsupported_flow_settings_are_refused():
    flow = decoder_yaml_for_preset("tiny")["flow"]
    flow["encoder"]["use_cnn_module"] = True
    with pytest.raises(DecoderConfigError, match="use_cnn_module"):
        FlowConfig.from_yaml_dict(flow)
    flow = decoder_yaml_for_preset("tiny")["flow"]
    flow["encoder"]["bogus"] = 1
    with pytest.raises(DecoderConfigError, match="unknown setting"):
        FlowConfig.from_yaml_dict(flow)
