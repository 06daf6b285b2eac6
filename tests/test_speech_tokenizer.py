"""GLM-4-Voice speech tokenizer: released layout, strict loading, official token semantics, CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.encoder.benchmark import speech_like, tokenizer_ms_per_audio_s
from vitaserve.encoder.checkpoint import (
    RELEASED_CONFIG,
    RELEASED_PREPROCESSOR,
    load_encoder,
    write_tokenizer_checkpoint,
)
from vitaserve.encoder.config import WhisperVQConfig
from vitaserve.encoder.model import WhisperVQEncoder, attention_bias
from vitaserve.encoder.tokenizer import SpeechTokenizer

SR = 16000

# Token ids that the official GLM-4-Voice code (speech_tokenizer/utils.py extract_speech_token with
# modeling_whisper.WhisperVQEncoder, transformers 4.44.1, CPU) produced for the tiny seed-0 folder
# and speech_like(3.0). The same run gave identical ids to ours for 31.3 s (two windows), silence,
# 0.1 s, 60 s and 70 s inputs, on both the tiny and the released-size folders.
OFFICIAL_TINY_SPEECH_LIKE_3S = [
    9451, 9451, 12234, 9451, 9451, 12234, 9451, 9451, 9451, 6987, 9451, 9451, 12660, 9451, 9451, 12660, 9451,
    9451, 12660, 9451, 9451, 5784, 9451, 9451, 11682, 9451, 9451, 12234, 9451, 9451, 11367, 8005, 9451, 9451,
    9451, 9451, 9451, 12660,
]
# speech_like(31.3, seed=1): two windows, 392 ids; sha256 of json.dumps(ids)[:16] and the last 8 ids
OFFICIAL_TINY_TWO_WINDOWS = ("948c9ccba527bab9", [2920, 9451, 9451, 12234, 9451, 9451, 12234, 9451])


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory):
    return write_tokenizer_checkpoint(tmp_path_factory.mktemp("tok") / "tokenizer", "tiny", seed=0)


@pytest.fixture(scope="session")
def tok(tiny_tok_dir):
    return SpeechTokenizer.from_pretrained(tiny_tok_dir)


@pytest.fixture(scope="session")
def espeak_wav(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog. Speech tokens arrive at twelve and a half per second."
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech(espeak_wav):
    """(22050 Hz mono float32 as espeak-ng writes it, the same resampled to 16 kHz with soxr)."""
    import soxr

    from vitaserve.common.wav import read_wav

    audio, rate = read_wav(espeak_wav)
    assert rate == 22050 and audio.shape[0] == 1
    return audio[0], soxr.resample(audio[0], rate, SR).astype(np.float32)


# ---- checkpoint layout and strict loading ----

def test_tiny_folder_is_laid_out_like_the_released_one(tiny_tok_dir):
    assert sorted(p.name for p in tiny_tok_dir.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    cfg = json.loads((tiny_tok_dir / "config.json").read_text())
    assert set(cfg) == set(RELEASED_CONFIG) and cfg["quantize_vocab_size"] == 16384 and cfg["d_model"] == 64
    assert json.loads((tiny_tok_dir / "preprocessor_config.json").read_text()) == RELEASED_PREPROCESSOR
    assert (tiny_tok_dir / "model.safetensors").stat().st_size < 12e6  # a few MB
    with safe_open(str(tiny_tok_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("codebook.weight").get_shape() == [16384, 64]
    assert {"conv1.weight", "layers.1.self_attn.k_proj.weight", "ema_count", "ema_weight", "embed_positions2.weight"} <= keys
    assert "layers.1.self_attn.k_proj.bias" not in keys and "layer_norm.weight" not in keys


def test_released_shapes_match_the_published_file():
    """The released model.safetensors is 1,458,374,480 bytes: 343.6 M parameters + EMA buffers, fp32."""
    with torch.device("meta"):
        model = WhisperVQEncoder(WhisperVQConfig.from_dict(RELEASED_CONFIG))
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 343_599_360
    assert sum(t.numel() for t in state.values()) * 4 == 1_458_349_056  # + 25,424-byte header
    assert len(model.layers) == 16 and state["embed_positions2.weight"].shape == (375, 1280)
    assert isinstance(model.conv1.left_padding, int) and model.conv1.left_padding == 2


def test_strict_load(tiny_tok_dir):
    model = load_encoder(tiny_tok_dir)
    file_state = load_file(str(tiny_tok_dir / "model.safetensors"))
    assert set(model.state_dict()) == set(file_state)
    assert torch.equal(model.state_dict()["layers.0.fc1.weight"], file_state["layers.0.fc1.weight"])
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_key_is_named(tiny_tok_dir, tmp_path):
    folder = _rewrite(tiny_tok_dir, tmp_path / "t", lambda s: s.pop("layers.1.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.fc2\.bias"):
        load_encoder(folder)


def test_misshaped_and_unexpected_keys_are_named(tiny_tok_dir, tmp_path):
    def edit(state):
        state["codebook.weight"] = torch.zeros(16383, 64)
        state["layer_norm.weight"] = torch.ones(64)

    with pytest.raises(CheckpointError) as err:
        load_encoder(_rewrite(tiny_tok_dir, tmp_path / "t", edit))
    assert "mis-shaped keys: codebook.weight (file [16383, 64], model [16384, 64])" in str(err.value)
    assert "unexpected keys: layer_norm.weight" in str(err.value)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_encoder(tmp_path)


# ---- model pieces against independent references ----

def test_block_causal_mask_equals_the_official_construction():
    valid = torch.tensor([[1] * 11 + [0] * 3, [1] * 14]).bool()
    length, block = 14, 4
    tril = torch.tril(torch.ones(length, length, dtype=torch.bool))
    blocks = torch.block_diag(*[torch.ones(min(block, length - s), min(block, length - s)) for s in range(0, length, block)]).bool()
    official = ((tril | blocks)[None] & valid[:, None, :]).float()
    official = ((1.0 - official) * torch.finfo(torch.float32).min)[:, None]
    assert torch.equal(attention_bias(valid, block, torch.float32), official)


def test_quantizer_picks_the_nearest_codebook_row(tok):
    model = tok.model
    codebook = model.codebook.weight
    hidden = codebook[torch.tensor([[5, 16383, 700]])] + 1e-4 * torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
    assert model.quantize(hidden).tolist() == [[5, 16383, 700]]
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    brute = torch.cdist(x.reshape(-1, 64).double(), codebook.double()).argmin(dim=1).view(2, 9)
    assert torch.equal(model.quantize(x), brute)


def test_layers_equal_transformers_whisper_encoder():
    """Fidelity anchor: with causal conv and block mask off, conv front end + layers are Whisper's."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    hf_cfg = WhisperConfig(d_model=64, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=256,
                           num_mel_bins=128, max_source_positions=40)
    hf_cfg._attn_implementation = "eager"
    hf = WhisperEncoder(hf_cfg).eval()
    raw = {**hf_cfg.to_dict(), "quantize_vocab_size": 16384, "quantize_position": 3, "pooling_kernel_size": 4,
           "pooling_type": "avg", "pooling_position": 3, "quantize_encoder_only": False,
           "encoder_causal_convolution": False, "quantize_causal_block_size": None}
    ours = WhisperVQEncoder(WhisperVQConfig.from_dict(raw)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert sorted(missing) == ["codebook.weight", "embed_positions2.weight"] and unexpected == []
    features = torch.randn(2, 128, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(features, output_hidden_states=True).hidden_states
        x = F.gelu(ours.conv1(features))
        x = F.gelu(ours.conv2(x)).transpose(1, 2) + ours.embed_positions.weight[:40]
        bias = attention_bias(torch.ones(2, 40, dtype=torch.bool), None, x.dtype)
        torch.testing.assert_close(x, expected[0], rtol=1e-5, atol=1e-5)
        for i, layer in enumerate(ours.layers):
            x = layer(x, bias)
            got = ours.layer_norm(x) if i == len(ours.layers) - 1 else x
            torch.testing.assert_close(got, expected[i + 1], rtol=1e-5, atol=1e-5)


def test_features_equal_whisper_feature_extractor_as_the_official_code_calls_it(tok):
    """Both windows of one utterance, batched and padded together as utils.py does."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(**RELEASED_PREPROCESSOR)
    audio = speech_like(30 + 3830 / SR, seed=3)  # last window 10 samples short of a 1280 multiple
    segments = [audio[:480000], audio[480000:]]
    ref = fe(segments, sampling_rate=SR, return_attention_mask=True, return_tensors="pt", padding="longest",
             pad_to_multiple_of=1280)
    windows = tok._windows(0, audio)
    for row, window in enumerate(windows):
        frames = window.features.shape[1]
        torch.testing.assert_close(window.features, ref.input_features[row, :, :frames], rtol=1e-5, atol=1e-5)
        assert window.valid_frames == int(ref.attention_mask[row].sum())
    # padding the short window only to its own length would change its last frame
    own = torch.zeros(3840)
    own[:3830] = torch.from_numpy(segments[1])
    assert (tok.log_mel(own)[:, -1] - windows[1].features[:, 23]).abs().max() > 1e-3


# ---- tokenizer behaviour ----

def test_official_tokens_for_fixed_inputs(tok):
    import hashlib

    assert tok.encode([speech_like(3.0)], SR) == [OFFICIAL_TINY_SPEECH_LIKE_3S]
    (ids,) = tok.encode([speech_like(31.3, seed=1)], SR)
    digest, tail = OFFICIAL_TINY_TWO_WINDOWS
    assert len(ids) == 392 and ids[-8:] == tail
    assert hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16] == digest


def test_token_rate_and_range_on_real_speech(tok, speech):
    _, audio16 = speech
    (ids,) = tok.encode([audio16], SR)
    seconds = len(audio16) / SR
    assert abs(len(ids) - 12.5 * seconds) <= 1 and len(ids) == math.ceil(len(audio16) / 1280)
    assert all(0 <= i < 16384 for i in ids) and len(set(ids)) > 10
    # the ids follow the audio, not just the positions: silence of the same length differs almost everywhere
    (quiet,) = tok.encode([np.zeros_like(audio16)], SR)
    assert np.mean(np.array(ids) != np.array(quiet)) > 0.5
    assert tok.tokens_per_second == 12.5 and tok.vocab_size == 16384


def test_batched_equals_alone(tok, speech):
    _, audio16 = speech
    utterances = [
        audio16,
        audio16[: 1280 * 20],  # an exact multiple of 1280: no padding at all
        audio16[: 1280 * 20 - 20],  # padding shorter than the STFT half window
        audio16[3000:4600],  # 0.1 s
        np.zeros(SR, np.float32),
        speech_like(31.3, seed=1),  # two windows
    ]
    alone = [tok.encode([u], SR)[0] for u in utterances]
    assert tok.encode(utterances, SR) == alone
    small_batches = SpeechTokenizer(tok.model, tok.mel, max_batch_frames=3000)  # one window per forward
    assert small_batches.encode(utterances, SR) == alone


def test_sixty_seconds_is_two_independent_windows(tok):
    audio = speech_like(60.0, seed=2)
    (ids,) = tok.encode([audio], SR)
    assert len(ids) == 750
    assert ids == tok.encode([audio[:480000]], SR)[0] + tok.encode([audio[480000:]], SR)[0]


def test_silence_and_very_short_input(tok):
    silence, short = tok.encode([np.zeros(2 * SR, np.float32), speech_like(0.1)], SR)
    assert len(silence) == 25 and len(short) == 2
    assert all(0 <= i < 16384 for i in silence + short)
    assert tok.encode([np.zeros(1, np.float32)], SR)[0].__len__() == 1


def test_other_rates_are_resampled_and_channel_zero_is_used(tok, speech):
    audio22, audio16 = speech
    (at22,) = tok.encode([audio22], 22050)
    assert at22 == tok.encode([audio16], SR)[0]  # both go through soxr the same way
    noise = np.random.default_rng(0).standard_normal(audio22.shape).astype(np.float32)
    assert tok.encode([np.stack([audio22, noise])], 22050) == [at22]
    import soxr

    (at8,) = tok.encode([soxr.resample(audio16, SR, 8000)], 8000)
    assert abs(len(at8) - len(at22)) <= 1 and all(0 <= i < 16384 for i in at8)
    assert tok.encode([audio16.astype(np.float64)], float(SR)) == [tok.encode([audio16], SR)[0]]


@pytest.mark.parametrize(
    "waveforms, rate, message",
    [
        ([np.array([], np.float32)], SR, "waveform 0 is empty"),
        ([np.ones(100, np.float32), np.array([0.1, np.nan], np.float32)], SR, "waveform 1 contains NaN or infinite"),
        ([np.array([0.0, np.inf], np.float32)], SR, "NaN or infinite"),
        ([np.zeros(100, np.int16)], SR, "dtype int16"),
        ([np.zeros((1, 2, 100), np.float32)], SR, "expected \\(samples,\\) or \\(channels, samples\\)"),
        ([np.zeros((1000, 2), np.float32)], SR, "must be \\(channels, samples\\)"),
        ([[0.0, 0.1]], SR, "is a list; expected a numpy array"),
        (np.zeros(100, np.float32), SR, "must be a list of numpy arrays"),
        ([np.zeros(100, np.float32)], 0, "sample_rate must be positive"),
        ([np.zeros(100, np.float32)], -8000, "sample_rate must be positive"),
        ([np.zeros(100, np.float32)], "16k", "sample_rate must be a number"),
    ],
)
def test_bad_input_is_a_clear_value_error(tok, waveforms, rate, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(waveforms, rate)


def test_empty_batch(tok):
    assert tok.encode([], SR) == []


def test_benchmark_function_runs(tok):
    ms = tokenizer_ms_per_audio_s(tok, seconds=1.0, repeats=1)
    assert 0 < ms < 10_000


# ---- command line ----

def test_cli_encode_prints_json(tiny_tok_dir, espeak_wav, speech, tok, capsys):
    from vitaserve.cli.main import main

    assert main(["encode", "--tokenizer", str(tiny_tok_dir), "--in", str(espeak_wav), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"tokens": tok.encode([speech[0]], 22050)[0]}


def test_cli_encode_bad_file_is_one_line(tiny_tok_dir, tmp_path, capsys):
    from vitaserve.cli.main import main

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav at all")
    assert main(["encode", "--tokenizer", str(tiny_tok_dir), "--in", str(bad), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a WAV file" in err
    assert main(["encode", "--tokenizer", str(tmp_path), "--in", str(bad)]) == 2
    assert main(["encode", "--tokenizer", str(tiny_tok_dir), "--in", str(tmp_path / "missing.wav")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_read_wav_formats(tmp_path):
    import wave

    from vitaserve.common.wav import read_wav

    pcm = (np.array([[0, 16384, -32768], [100, -100, 32767]], np.int16)).T.copy()
    with wave.open(str(tmp_path / "s16.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    audio, rate = read_wav(tmp_path / "s16.wav")
    assert rate == 8000 and audio.shape == (2, 3)
    np.testing.assert_allclose(audio[0], [0.0, 0.5, -1.0])


def test_make_checkpoint_writes_the_tokenizer(tmp_path):
    from vitaserve.cli.main import main

    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path), "--only", "tokenizer"]) == 0
    assert SpeechTokenizer.from_pretrained(tmp_path / "tokenizer").encode([speech_like(3.0)], SR) == [OFFICIAL_TINY_SPEECH_LIKE_3S]
