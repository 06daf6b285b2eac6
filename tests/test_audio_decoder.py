"""AudioDecoder on the tiny random-weight folder: one shot, official streaming, resume, VITA re-decode."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from vitaserve.cli.main import main as cli_main
from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.decoder.audio_decoder import AudioDecoder, split_blocks
from vitaserve.decoder.checkpoint import write_decoder_checkpoint
from vitaserve.decoder.stream_state import DecoderStreamState

TOKENS = np.random.default_rng(7).integers(0, 16384, 48).tolist()
BLOCKS = [12, 20]  # -> 12, 20, 16: three blocks, the last one final
STEPS = 2  # ODE steps: the tests check the plumbing, not the mel quality


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return write_decoder_checkpoint(tmp_path_factory.mktemp("decoder"), "tiny", seed=0)


@pytest.fixture(scope="module")
def dec(decoder_dir):
    return AudioDecoder.from_pretrained(decoder_dir)


def test_tiny_folder_is_small_and_loads_strictly(decoder_dir, tmp_path):
    sizes = {p.name: p.stat().st_size for p in decoder_dir.iterdir()}
    assert set(sizes) == {"config.yaml", "flow.pt", "hift.pt"}
    assert sum(sizes.values()) < 8e6
    state = torch.load(decoder_dir / "hift.pt", weights_only=True)
    state.pop("m_source.l_linear.bias")
    for name in ("config.yaml", "flow.pt"):
        (tmp_path / name).write_bytes((decoder_dir / name).read_bytes())
    torch.save(state, tmp_path / "hift.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: m_source\.l_linear\.bias"):
        AudioDecoder.from_pretrained(tmp_path)


def test_one_shot_length_and_determinism(dec):
    a = dec.decode(TOKENS, STEPS, deterministic=True)
    b = dec.decode(TOKENS, STEPS, deterministic=True)
    assert a.dtype == np.float32 and a.shape == (dec.flow.mel_frames(len(TOKENS)) * 256,)
    assert np.array_equal(a, b)
    seeded = dec.decode(TOKENS, STEPS)
    assert np.array_equal(seeded, dec.decode(TOKENS, STEPS)) and not np.array_equal(seeded, a)
    assert np.abs(a).max() <= 0.99 and np.abs(a).max() > 1e-4


def test_one_shot_uses_one_generator_seeded_42_flow_then_hift(dec):
    """The official order on CPU: manual_seed(42), flow start noise, then the vocoder's draws."""
    g = torch.Generator().manual_seed(42)
    tok = torch.tensor([TOKENS])
    mel = dec.flow.inference(tok, len(TOKENS), tok[:, :0], 0, torch.zeros(1, 0, 80), 0, torch.zeros(1, 192),
                             n_timesteps=STEPS, generator=g)
    speech, _ = dec.hift.inference(mel, generator=g)
    assert np.array_equal(dec.decode(TOKENS, ode_steps=STEPS), speech[0].numpy())


def test_single_final_block_equals_one_shot(dec):
    one = dec.decode(TOKENS, STEPS)
    (chunk,) = dec.decode_stream(TOKENS, [len(TOKENS)], ode_steps=STEPS)
    pcm, state = dec.decode_chunk(dec.start_stream(), TOKENS, finalize=True, ode_steps=STEPS)
    assert np.array_equal(one, chunk) and np.array_equal(one, pcm)
    assert state.finalized


def _official_lengths(dec, blocks: list[list[int]]) -> list[int]:
    """The official bookkeeping: new frames = frames(all tokens) - prompt mel frames; +1 HiFT-cache
    frame after the first block; non-final blocks hold back 34 frames and drop 256 samples."""
    lengths, prompt_frames, n = [], 0, 0
    for i, block in enumerate(blocks):
        n += len(block)
        frames = dec.flow.mel_frames(n) - prompt_frames + (1 if i else 0)
        final = i == len(blocks) - 1
        returned = frames if final else frames - dec.mel_overlap_len
        lengths.append(returned * 256 - (0 if final else 256))
        prompt_frames += returned
    return lengths


def test_streamed_lengths_follow_the_official_rule(dec):
    blocks = split_blocks(TOKENS, BLOCKS)
    chunks = dec.decode_stream(TOKENS, BLOCKS, ode_steps=STEPS, deterministic=True)
    assert [len(c) for c in chunks] == _official_lengths(dec, blocks)
    # closed form: 256 * (frames(N) + 2 - K) for K > 1 blocks (one-shot: 256 * frames(N))
    assert sum(len(c) for c in chunks) == 256 * (dec.flow.mel_frames(len(TOKENS)) + 2 - len(blocks))
    # the stream is not the one-shot waveform (the prompt mel is misaligned on purpose)
    assert not np.array_equal(np.concatenate(chunks)[:5000], dec.decode(TOKENS, STEPS, deterministic=True)[:5000])


@pytest.mark.parametrize("det,seeding", [(True, "per_block"), (False, "per_block"), (False, "per_stream")])
def test_resume_from_bytes_mid_stream_is_identical(dec, det, seeding):
    blocks = split_blocks(TOKENS, BLOCKS)
    straight = dec.decode_stream(TOKENS, BLOCKS, ode_steps=STEPS, deterministic=det, seeding=seeding)
    state = dec.start_stream(deterministic=det, seeding=seeding)
    resumed = []
    for i, block in enumerate(blocks):
        state = DecoderStreamState.from_bytes(state.to_bytes())  # as if fetched from Redis by another replica
        pcm, state = dec.decode_chunk(state, block, finalize=i == len(blocks) - 1, ode_steps=STEPS)
        resumed.append(pcm)
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed))
    assert state.finalized and state.mel_overlap.numel() == 0 and state.hift_cache_source.numel() == 0


def test_seeding_modes(dec):
    per_block = dec.decode_stream(TOKENS[:32], BLOCKS, ode_steps=STEPS, seeding="per_block")
    per_stream = dec.decode_stream(TOKENS[:32], BLOCKS, ode_steps=STEPS, seeding="per_stream")
    assert np.array_equal(per_block[0], per_stream[0])  # both start from seed 42
    assert not np.array_equal(per_block[1], per_stream[1])  # the carried state draws new noise


def test_state_is_a_value_and_finalize_ends_the_stream(dec):
    s0 = dec.start_stream(deterministic=True)
    pcm1, s1 = dec.decode_chunk(s0, TOKENS[:12], ode_steps=STEPS)
    assert s0.tokens_done == 0 and s0.prompt_mel.shape == (80, 0)  # the input state is untouched
    assert s1.tokens_done == 12 and s1.mel_overlap.shape == (80, 34) and s1.hift_cache_source.shape == (256,)
    assert s1.prompt_mel.shape[1] == pcm1.shape[0] // 256 + 1  # returned mel = vocoded frames
    again, _ = dec.decode_chunk(s0, TOKENS[:12], ode_steps=STEPS)
    assert np.array_equal(pcm1, again)
    # finalize with no new tokens vocodes the held-back overlap (+ the HiFT cache frame)
    tail, s2 = dec.decode_chunk(s1, [], finalize=True)
    assert tail.shape == ((34 + 1) * 256,) and s2.finalized
    with pytest.raises(ValueError, match="finalized"):
        dec.decode_chunk(s2, TOKENS[:3])
    with pytest.raises(ValueError, match=r"\[0, 16384\)"):
        dec.decode_chunk(s1, [5, 16384])
    with pytest.raises(ValueError, match="no audio tokens"):
        dec.decode_chunk(s1, [])


def test_state_bytes_grow_with_prompt_mel(dec):
    _, s = dec.decode_chunk(dec.start_stream(), TOKENS[:24], ode_steps=STEPS)
    size = len(s.to_bytes())
    mel_bytes = s.prompt_mel.numel() * 4
    assert mel_bytes < size < mel_bytes + 16_000  # + overlap, caches, tokens, header


def test_vita_redecode_mode(dec):
    s = dec.start_stream(mode="vita_redecode", deterministic=True)
    first, s = dec.decode_chunk(s, TOKENS[:10])
    assert np.array_equal(first, dec.decode(TOKENS[:10], ode_steps=1, deterministic=True))
    held, s = dec.decode_chunk(s, TOKENS[10:20])  # only 10 new tokens (<= 16): nothing yet
    assert held.shape == (0,) and s.tokens_done == 20
    second, s = dec.decode_chunk(s, TOKENS[20:30])  # 20 new: re-decode all 30 with 3 ODE steps
    full = dec.decode(TOKENS[:30], ode_steps=3, deterministic=True)
    assert np.array_equal(second, full[len(first):])
    last, s = dec.decode_chunk(s, TOKENS[30:35], finalize=True)  # finalize decodes what waits
    assert np.array_equal(last, dec.decode(TOKENS[:35], ode_steps=5, deterministic=True)[len(full):])
    assert s.finalized and s.next_ode_steps == 7


def test_cli_decode_writes_wav(decoder_dir, tmp_path, capsys):
    ids = ",".join(map(str, TOKENS))
    out = tmp_path / "one.wav"
    assert cli_main(["decode", "--decoder", str(decoder_dir), "--tokens", ids, "--out", str(out),
                     "--deterministic", "--ode-steps", "2"]) == 0
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (22050, 2, 1)
        assert w.getnframes() == 256 * 330  # frames(48 tokens) = int(48 * 6.890625)
    out2 = tmp_path / "stream.wav"
    assert cli_main(["decode", "--decoder", str(decoder_dir), "--tokens", ids, "--out", str(out2), "--stream",
                     "--chunk-sizes", "12,20", "--float", "--ode-steps", "2"]) == 0
    raw = out2.read_bytes()
    assert raw[20:22] == b"\x03\x00"  # IEEE float
    assert (len(raw) - raw.index(b"data") - 8) // 4 == 256 * (330 + 2 - 3)


@pytest.mark.parametrize("tokens,message", [("1,2,99999", "16384"), ("", "empty"), ("1,x", "integers")])
def test_cli_rejects_bad_tokens_in_one_line(decoder_dir, tmp_path, capsys, tokens, message):
    code = cli_main(["decode", "--decoder", str(decoder_dir), "--tokens", tokens, "--out", str(tmp_path / "x.wav")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.wav").exists()


def test_codec_benchmark_reports_every_decoder_number(decoder_dir):
    from vitaserve.decoder.benchmark import run_codec_benchmark

    result = run_codec_benchmark(None, decoder_dir, batch_sizes=(1, 3))
    for key in ("decoder_first_pcm_ms", "decoder_first_pcm_ms_10tok_1step", "decoder_rtf_oneshot", "decoder_rtf_stream"):
        assert result[key] > 0, key
    assert "tokenizer_ms_per_audio_s" not in result  # no tokenizer folder given
    assert [row["batch"] for row in result["decoder_batch"]] == [1, 3]
    assert all(row["batched_ms"] > 0 and row["speedup"] > 0 for row in result["decoder_batch"])
