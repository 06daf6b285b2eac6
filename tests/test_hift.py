"""HiFT vocoder, decoder stream state and block splitting: real modules, tiny sizes, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.decoder.audio_decoder import check_tokens, hamming_cross_fade, split_blocks
from vitaserve.decoder.checkpoint import random_hift_state
from vitaserve.decoder.hift import HiftConfig, HiFTGenerator, load_hift
from vitaserve.decoder.stream_state import DecoderStreamState, StreamStateError

CFG = HiftConfig(base_channels=32, f0_cond_channels=16)


@pytest.fixture(scope="module")
def hift_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hift") / "hift.pt"
    torch.save(random_hift_state(CFG, seed=1), path)
    return path


@pytest.fixture(scope="module")
def hift(hift_file):
    return load_hift(hift_file, CFG)


def _mel(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed)) * 2 - 5


def test_config_from_released_yaml_values():
    d = {"_class": "cosyvoice.hifigan.generator.HiFTGenerator", "in_channels": 80, "base_channels": 512,
         "nb_harmonics": 8, "sampling_rate": 22050, "nsf_alpha": 0.1, "nsf_sigma": 0.003,
         "nsf_voiced_threshold": 10, "upsample_rates": [8, 8], "upsample_kernel_sizes": [16, 16],
         "istft_params": {"n_fft": 16, "hop_len": 4}, "resblock_kernel_sizes": [3, 7, 11],
         "resblock_dilation_sizes": [[1, 3, 5]] * 3, "source_resblock_kernel_sizes": [7, 11],
         "source_resblock_dilation_sizes": [[1, 3, 5]] * 2, "lrelu_slope": 0.1, "audio_limit": 0.99,
         "f0_predictor": {"_class": "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor", "num_class": 1,
                          "in_channels": 80, "cond_channels": 512}}
    cfg = HiftConfig.from_yaml_dict(d)
    assert cfg == HiftConfig()
    assert cfg.samples_per_frame == 256
    # the released key names and shapes (a few that the official generator.py defines)
    sd = HiFTGenerator(cfg).state_dict()
    assert sd["conv_pre.weight_v"].shape == (512, 80, 7)
    assert sd["ups.0.weight_g"].shape == (512, 1, 1)  # ConvTranspose1d weight norm over dim 0
    assert sd["source_downs.0.weight"].shape == (256, 18, 16)
    assert sd["resblocks.5.activations2.2.alpha"].shape == (128,)
    assert sd["f0_predictor.condnet.8.weight_g"].shape == (512, 1, 1)
    assert sd["m_source.l_linear.weight"].shape == (1, 9)
    with pytest.raises(CheckpointError, match="unknown keys: bogus"):
        HiftConfig.from_yaml_dict({**d, "bogus": 1})


@pytest.mark.parametrize("frames", [1, 7, 40])
def test_output_length_is_frames_times_256(hift, frames):
    speech, source = hift.inference(_mel(frames), generator=torch.Generator().manual_seed(42))
    assert speech.shape == (1, frames * 256)
    assert source.shape == (1, 1, frames * 256)
    assert speech.abs().max() <= 0.99 and torch.isfinite(speech).all()


def test_strict_load_names_bad_keys(tmp_path, hift_file):
    state = torch.load(hift_file, weights_only=True)
    missing = dict(state)
    del missing["conv_post.weight_g"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: conv_post\.weight_g"):
        load_hift(tmp_path / "missing.pt", CFG)
    shaped = dict(state, **{"ups.1.bias": torch.zeros(3)})
    torch.save(shaped, tmp_path / "shaped.pt")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: ups\.1\.bias \(file \[3\], model \[8\]\)"):
        load_hift(tmp_path / "shaped.pt", CFG)
    extra = dict(state, **{"generator.extra": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: generator\.extra"):
        load_hift(tmp_path / "extra.pt", CFG)
    with pytest.raises(CheckpointError, match="does not match"):
        load_hift(hift_file, HiftConfig(base_channels=64, f0_cond_channels=16))


def test_folded_weight_norm_equals_per_call_weight_norm(hift_file, hift):
    unfolded = HiFTGenerator(CFG).eval()
    unfolded.load_state_dict(torch.load(hift_file, weights_only=True))
    mel = _mel(12)
    a, _ = unfolded.inference(mel, deterministic=True)
    b, _ = hift.inference(mel, deterministic=True)
    assert torch.equal(a, b)


def test_deterministic_runs_identical_and_random_runs_seeded(hift):
    mel = _mel(20)
    d1, _ = hift.inference(mel, deterministic=True)
    d2, _ = hift.inference(mel, deterministic=True)
    assert torch.equal(d1, d2)
    r1, _ = hift.inference(mel, generator=torch.Generator().manual_seed(42))
    r2, _ = hift.inference(mel, generator=torch.Generator().manual_seed(42))
    r3, _ = hift.inference(mel, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1, r2)
    assert not torch.equal(r1, r3) and not torch.equal(r1, d1)


def test_random_draws_follow_the_official_order(hift):
    """phases (9 uniforms), SineGen noise (9 x L normals), the unused source noise (L normals)."""
    frames = 5
    L = frames * 256
    g = torch.Generator().manual_seed(3)
    hift.inference(_mel(frames), generator=g)
    ref = torch.Generator().manual_seed(3)
    torch.rand((1, 9, 1), generator=ref)
    torch.randn((1, 9, L), generator=ref)
    torch.randn((1, L, 1), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_sine_phase_integration_of_a_row_does_not_depend_on_the_batch(hift):
    """The cumulative sum of phase increments runs per row: batched sines differ from a row's alone
    only if its F0 does (test_decoder_batching's source tolerance is derived from that)."""
    f0 = torch.rand(3, 1, 40 * 256, generator=torch.Generator().manual_seed(0)) * 300
    src = hift.m_source
    for deterministic, seeds in ((True, None), (False, (42, 5, 42))):
        gens = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
        batch = src.sine_waves(f0, gens, deterministic)
        for i in range(3):
            gen = None if seeds is None else torch.Generator().manual_seed(seeds[i])
            assert torch.equal(batch[i : i + 1], src.sine_waves(f0[i : i + 1], gen, deterministic))


def test_cache_source_replaces_the_first_source_samples(hift):
    cache = torch.linspace(-0.5, 0.5, 256)[None, None]
    _, source = hift.inference(_mel(6), cache, generator=torch.Generator().manual_seed(42))
    assert torch.equal(source[:, :, :256], cache)
    # and it changes the waveform (the source feeds the filter)
    a, _ = hift.inference(_mel(6), cache, deterministic=True)
    b, _ = hift.inference(_mel(6), None, deterministic=True)
    assert not torch.equal(a, b)


def test_partly_voiced_pitch_from_random_checkpoint(hift):
    f0 = hift.f0_predictor(_mel(50))
    voiced = (f0 > CFG.nsf_voiced_threshold).float().mean().item()
    assert 0.05 < voiced < 1.0  # the tests exercise both the sine and the noise branch


def test_hamming_cross_fade_matches_float64_blend():
    window = np.hamming(68)
    new = torch.randn(1, 80, 50)
    old = torch.randn(1, 80, 34)
    out = hamming_cross_fade(new, old, window)
    ref = (new[..., :34].double().numpy() * window[:34] + old.double().numpy() * window[34:]).astype(np.float32)
    assert np.array_equal(out[..., :34].numpy(), ref)
    assert torch.equal(out[..., 34:], new[..., 34:])


def test_split_blocks_web_demo_sizes():
    tokens = list(range(600))
    blocks = split_blocks(tokens)
    assert [len(b) for b in blocks] == [25, 50, 100, 150, 200, 75]
    assert sum(blocks, []) == tokens
    assert [len(b) for b in split_blocks(list(range(75)), [25, 50])] == [25, 50]
    assert [len(b) for b in split_blocks(list(range(31)), [10])] == [10, 10, 10, 1]
    with pytest.raises(ValueError, match="positive"):
        split_blocks(tokens, [25, 0])


def test_bad_tokens_rejected():
    with pytest.raises(ValueError, match="no audio tokens"):
        check_tokens([])
    with pytest.raises(ValueError, match=r"\[0, 16384\); got \[16384, -1\]"):
        check_tokens([1, 16384, -1])
    assert check_tokens([0, 16383]) == [0, 16383]


def test_stream_state_bytes_round_trip():
    s = DecoderStreamState(seeding="per_stream", blocks_done=3, samples_out=1234, next_ode_steps=5)
    s.prompt_tokens = torch.tensor([1, 2, 16383], dtype=torch.int32)
    s.prompt_mel = torch.randn(80, 17)
    s.mel_overlap = torch.randn(80, 34)
    s.hift_cache_mel = torch.randn(80, 1)
    s.hift_cache_source = torch.randn(256)
    s.rng_state = torch.Generator().manual_seed(42).get_state()
    data = s.to_bytes()
    back = DecoderStreamState.from_bytes(data)
    for name in DecoderStreamState._TENSORS:
        assert torch.equal(getattr(back, name), getattr(s, name)), name
    for name in DecoderStreamState._SCALARS:
        assert getattr(back, name) == getattr(s, name), name
    with pytest.raises(StreamStateError, match="too short"):
        DecoderStreamState.from_bytes(b"abc")
    with pytest.raises(StreamStateError, match="version 99"):
        DecoderStreamState.from_bytes(data.replace(b'"version":"1"', b'"version":"99"'))
