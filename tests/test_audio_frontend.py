"""The gateway's audio front end: wire codecs, resampling, VAD on real (espeak-ng) speech, token blocks."""

from __future__ import annotations

import shutil
import subprocess
import warnings
import wave

import numpy as np
import pytest
import torch

from vitaserve.gateway import codecs
from vitaserve.gateway.answer import AnswerProgress
from vitaserve.gateway.chunker import PRESETS, ChunkPlan, ChunkPlanError, TokenChunker
from vitaserve.gateway.codecs import (AudioFormatError, PayloadError, SampleValueError, UnknownCodecError,
                                      UnsupportedRateError, decode_audio, encode_audio)
from vitaserve.common.resample import ResampleError, StreamResampler, resample
from vitaserve.gateway.vad import (SileroVad, SpeechEnded, SpeechStarted, VadConfig, VadConfigError,
                                   VadInputError, VoiceActivityDetector, shared_model)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # stdlib until 3.12: the reference G.711 implementation
    except ImportError:
        audioop = None

ALL_PCM = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
ALL_CODES = bytes(range(256))


# ---- G.711 and PCM16 ------------------------------------------------------------------------------

def _g711_decode(codes: list[int], codec: str) -> list[int]:
    return list(np.rint(decode_audio(bytes(codes), codec, 8000) * 32768).astype(int))


def test_g711_known_values_from_the_standard():
    assert _g711_decode([0xFF, 0x7F, 0x00, 0x80, 0xFE], "mulaw") == [0, 0, -32124, 32124, 8]
    assert _g711_decode([0xD5, 0x55, 0xAA, 0x2A, 0xD4], "alaw") == [8, -8, 32256, -32256, 24]
    silence = np.zeros(4, dtype=np.float32)
    assert encode_audio(silence, "mulaw", 8000) == b"\xff" * 4
    assert encode_audio(silence, "alaw", 8000) == b"\xd5" * 4
    # the loudest codes at full scale
    assert encode_audio(np.array([1.0, -1.0], np.float32), "mulaw", 8000) == b"\x80\x00"
    assert encode_audio(np.array([1.0, -1.0], np.float32), "alaw", 8000) == b"\xaa\x2a"


@pytest.mark.parametrize("codec", ["mulaw", "alaw"])
def test_g711_round_trip_within_quantisation_step(codec):
    x = ALL_PCM.astype(np.int32)
    code = np.frombuffer(codecs.encode_audio(codecs.to_float(ALL_PCM), codec, 8000), dtype=np.uint8)
    y = np.rint(decode_audio(code.tobytes(), codec, 8000) * 32768).astype(np.int32)
    err = np.abs(y - x)
    if codec == "mulaw":
        seg = ((~code) & 0x70).astype(np.int32) >> 4
        step, top, slack = 8 << seg, 32124, 4  # mu-law codes 14 bits: up to 3 dropped LSBs more
    else:
        seg = ((code ^ 0x55) & 0x70).astype(np.int32) >> 4
        step, top, slack = np.where(seg < 2, 16, 16 << np.maximum(seg - 1, 0)), 32256, 0
    inside = np.abs(x) <= top
    assert (err[inside] <= step[inside] // 2 + slack).all()
    assert err[~inside].max() <= 32768 - top  # beyond the largest code: clipped to it
    assert np.array_equal(np.sign(y[np.abs(x) > 16]), np.sign(x[np.abs(x) > 16]))
    # decoding then re-encoding any code gives the same code (0x7F/0xFF are both mu-law zero)
    again = np.frombuffer(encode_audio(decode_audio(ALL_CODES, codec, 8000), codec, 8000), np.uint8)
    same = again == np.frombuffer(ALL_CODES, np.uint8)
    assert same.sum() == (255 if codec == "mulaw" else 256)


@pytest.mark.skipif(audioop is None, reason="the stdlib audioop module is gone in this Python")
def test_g711_equals_audioop_on_every_code_and_sample():
    assert codecs.pack_pcm16(codecs.ulaw_to_linear(np.frombuffer(ALL_CODES, np.uint8))) == audioop.ulaw2lin(ALL_CODES, 2)
    assert codecs.pack_pcm16(codecs.alaw_to_linear(np.frombuffer(ALL_CODES, np.uint8))) == audioop.alaw2lin(ALL_CODES, 2)
    raw = codecs.pack_pcm16(ALL_PCM)
    assert codecs.linear_to_ulaw(ALL_PCM).tobytes() == audioop.lin2ulaw(raw, 2)
    assert codecs.linear_to_alaw(ALL_PCM).tobytes() == audioop.lin2alaw(raw, 2)
    rng = np.random.default_rng(0)
    samples = (rng.standard_normal(8000) * 0.3).astype(np.float32)
    pcm = codecs.pack_pcm16(codecs.to_int16(samples))
    assert encode_audio(samples, "mulaw", 8000) == audioop.lin2ulaw(pcm, 2)
    assert encode_audio(samples, "alaw", 8000) == audioop.lin2alaw(pcm, 2)
    payload = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    assert codecs.pack_pcm16(codecs.to_int16(decode_audio(payload, "mulaw", 8000))) == audioop.ulaw2lin(payload, 2)
    assert codecs.pack_pcm16(codecs.to_int16(decode_audio(payload, "alaw", 8000))) == audioop.alaw2lin(payload, 2)


def test_pcm16_little_endian_and_exact_round_trip():
    assert list(codecs.unpack_pcm16(b"\x01\x00\xff\xff\x00\x80\xff\x7f")) == [1, -1, -32768, 32767]
    assert codecs.pack_pcm16(np.array([1, -2], np.int16)) == b"\x01\x00\xfe\xff"
    payload = np.random.default_rng(1).integers(0, 256, 960, dtype=np.uint8).tobytes()
    for rate in (8000, 16000, 24000, 48000):
        x = decode_audio(payload, "pcm16", rate)
        assert x.dtype == np.float32 and x.shape == (480,) and np.abs(x).max() <= 1.0
        assert encode_audio(x, "pcm16", rate) == payload
    loud = encode_audio(np.array([1.5, -3.0, 0.5], np.float32), "pcm16", 16000)
    assert list(codecs.unpack_pcm16(loud)) == [32767, -32768, 16384]  # clipped, not wrapped
    assert codecs.payload_duration_s(320, "pcm16", 8000) == 0.02
    assert codecs.payload_duration_s(160, "ulaw", 8000) == 0.02


def test_codec_names_accept_telephony_aliases():
    assert codecs.check_format("PCMU", 8000) == "mulaw"
    assert codecs.check_format("pcma", 8000) == "alaw"
    assert codecs.check_format(" L16 ", 48000) == "pcm16"


@pytest.mark.parametrize("call, error, words", [
    (lambda: decode_audio(b"\x00\x00", "opus", 48000), UnknownCodecError, "unknown codec 'opus'"),
    (lambda: decode_audio(b"\x00\x00", None, 8000), UnknownCodecError, "codec must be"),
    (lambda: decode_audio(b"\x00\x00", "mulaw", 16000), UnsupportedRateError, "mulaw is supported at 8000 Hz"),
    (lambda: decode_audio(b"\x00\x00", "alaw", 44100), UnsupportedRateError, "not 44100"),
    (lambda: decode_audio(b"\x00\x00", "pcm16", 44100), UnsupportedRateError, "8000, 16000, 24000, 48000"),
    (lambda: decode_audio(b"\x00\x00", "pcm16", 16000.0), UnsupportedRateError, "not 16000.0"),
    (lambda: decode_audio(b"\x00\x00\x00", "pcm16", 16000), PayloadError, "odd number of bytes (3)"),
    (lambda: decode_audio("abc", "mulaw", 8000), PayloadError, "must be bytes"),
    (lambda: encode_audio(np.array([0.1, np.nan], np.float32), "pcm16", 8000), SampleValueError, "sample 1 is nan"),
    (lambda: encode_audio(np.array([np.inf]), "mulaw", 8000), SampleValueError, "finite"),
    (lambda: encode_audio(np.zeros((2, 4), np.float32), "alaw", 8000), SampleValueError, "1-D"),
    (lambda: encode_audio(np.zeros(4, np.int16), "pcm16", 8000), SampleValueError, "floats"),
    (lambda: encode_audio(np.zeros(4, np.float32), "pcm16", 22050), UnsupportedRateError, "22050"),
])
def test_codec_errors_are_clear_value_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, AudioFormatError) and isinstance(info.value, ValueError)
    assert words in str(info.value)


# ---- resampling ----------------------------------------------------------------------------------

RATE_PAIRS = [(8000, 16000), (48000, 16000), (24000, 16000), (22050, 8000), (22050, 24000), (22050, 48000)]


def _tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("in_rate, out_rate", RATE_PAIRS)
def test_resample_length_ratio_and_pitch(in_rate, out_rate):
    x = _tone(in_rate, 1.3)
    y = resample(x, in_rate, out_rate)
    assert y.dtype == np.float32
    assert abs(len(y) - len(x) * out_rate / in_rate) <= 1
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * out_rate / len(y)
    assert abs(peak_hz - 440.0) < 2.0  # same pitch at the new rate


@pytest.mark.parametrize("in_rate, out_rate", RATE_PAIRS)
def test_streamed_resampling_equals_one_shot(in_rate, out_rate):
    rng = np.random.default_rng(in_rate + out_rate)
    x = (rng.standard_normal(in_rate * 2) * 0.2).astype(np.float32)
    one_shot = resample(x, in_rate, out_rate)
    stream = StreamResampler(in_rate, out_rate)
    cuts = np.cumsum(rng.integers(1, in_rate // 20, 200))  # ragged chunks, 20 ms-ish
    cuts = cuts[cuts < len(x)]
    pieces = [stream.process(part) for part in np.split(x, cuts)] + [stream.flush()]
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(one_shot)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)
    assert stream.samples_in == len(x) and stream.samples_out == len(streamed)
    # flush leaves a fresh state: a second answer through the same object comes out the same
    again = np.concatenate([stream.process(x[: in_rate // 2]), stream.process(x[in_rate // 2 :]), stream.flush()])
    np.testing.assert_allclose(again, one_shot, atol=1e-5)


def test_resampler_holds_back_its_delay_and_reset_drops_it():
    stream = StreamResampler(8000, 16000)
    first = stream.process(_tone(8000, 0.02))
    assert len(first) < 320 and stream.delay_s > 0  # filter delay: not everything comes out at once
    stream.reset()
    assert len(stream.flush()) == 0
    same = StreamResampler(16000, 16000)
    assert same.passthrough and same.delay_s == 0.0
    x = _tone(16000, 0.02)
    assert np.array_equal(same.process(x), x) and len(same.flush()) == 0


@pytest.mark.parametrize("call, words", [
    (lambda: StreamResampler(0, 16000), "in_rate must be a positive"),
    (lambda: resample(np.zeros(8, np.float32), 8000, -1), "out_rate must be a positive"),
    (lambda: StreamResampler(8000, 16000, quality="best"), "unknown resampling quality 'best'"),
    (lambda: StreamResampler(8000, 16000).process(np.zeros((2, 8), np.float32)), "1-D"),
    (lambda: StreamResampler(8000, 16000).process(np.array([0.0, np.nan])), "NaN"),
    (lambda: resample(np.arange(8), 8000, 16000), "float samples"),
])
def test_resample_errors(call, words):
    with pytest.raises(ResampleError, match=words):
        call()


# ---- VAD on real speech --------------------------------------------------------------------------

SR = 16000


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    """Quiet line noise (-60 dBFS) instead of digital zeros, as a phone line has."""
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 1e-3).astype(np.float32)


@pytest.fixture(scope="session")
def speech(tmp_path_factory):
    """Two espeak-ng utterances at 16 kHz, with their true voiced spans (s) inside each array."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("speech")
    out = []
    for i, text in enumerate(["What is the weather like in Paris today?", "Please book a table for two."]):
        path = folder / f"u{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2
            rate, raw = w.getframerate(), w.readframes(w.getnframes())
        x = resample(decode_audio(raw, "pcm16", 16000), rate, SR)  # PCM16 bytes; the rate only labels them
        voiced = np.flatnonzero(np.abs(x) > 0.01)
        out.append((x, voiced[0] / SR, voiced[-1] / SR))
    return out


@pytest.fixture(scope="session")
def vad_model():
    return shared_model()


def _run(detector: VoiceActivityDetector, x: np.ndarray, chunk: int = 320) -> list:
    events = []
    for i in range(0, len(x), chunk):
        events += detector.process(x[i : i + chunk])
    return events


def test_silero_as_a_pure_function_equals_the_stateful_wrapper(speech, vad_model):
    from silero_vad import load_silero_vad

    threads = torch.get_num_threads()
    wrapper = load_silero_vad(onnx=False)
    torch.set_num_threads(threads)
    x = np.concatenate([_noise(0.3), speech[0][0]])[: 40 * 512]
    with torch.inference_mode():
        expected = [float(wrapper(torch.from_numpy(x[i : i + 512]), SR)) for i in range(0, len(x), 512)]
    ours, _ = vad_model.probs(x, SileroVad.initial_state())
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert max(expected) > 0.9 and min(expected) < 0.1  # the windows cover speech and silence


def test_one_utterance_gives_one_start_and_one_end_near_the_true_boundaries(speech, vad_model):
    utterance, v0, v1 = speech[0]
    lead = 1.0
    x = np.concatenate([_noise(lead), utterance, _noise(1.5, seed=1)])
    cfg = VadConfig()
    detector = VoiceActivityDetector(cfg, vad_model)
    events = _run(detector, x) + detector.flush()
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]
    started, ended = events
    assert abs(started.t - (lead + v0)) < 0.15
    assert abs(ended.t - (lead + v1)) < 0.25 and ended.reason == "silence" and ended.start == started.t
    # the audio is the input from onset - pre-roll to end + post-roll, sample for sample
    a = int(round(started.t * SR)) - cfg.pre_roll_ms * SR // 1000
    b = int(round(ended.t * SR)) + cfg.post_roll_ms * SR // 1000
    assert ended.audio.dtype == np.float32
    np.testing.assert_array_equal(ended.audio, x[a:b])
    assert not detector.in_speech


def test_silence_alone_gives_no_event(vad_model):
    detector = VoiceActivityDetector(model=vad_model)
    quiet = np.concatenate([_noise(2.0), np.zeros(SR, np.float32), _noise(1.0, seed=3)])
    assert _run(detector, quiet) == [] and detector.flush() == []
    assert detector.time_s == pytest.approx(4.0)


def test_two_utterances_one_second_apart_give_two(speech, vad_model):
    (u0, a0, b0), (u1, a1, b1) = speech
    x = np.concatenate([_noise(0.5), u0, _noise(1.0, seed=1), u1, _noise(1.0, seed=2)])
    detector = VoiceActivityDetector(model=vad_model)
    events = _run(detector, x) + detector.flush()
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded] * 2
    second_start = 0.5 + len(u0) / SR + 1.0
    assert abs(events[0].t - (0.5 + a0)) < 0.15 and abs(events[1].t - (0.5 + b0)) < 0.25
    assert abs(events[2].t - (second_start + a1)) < 0.15 and abs(events[3].t - (second_start + b1)) < 0.25
    assert events[3].audio.size < events[1].audio.size  # the shorter sentence, not the two joined


def test_events_do_not_depend_on_how_audio_is_chunked(speech, vad_model):
    x = np.concatenate([_noise(0.7), speech[1][0], _noise(1.0, seed=5)])
    small = _run(VoiceActivityDetector(model=vad_model), x, chunk=160)
    large = _run(VoiceActivityDetector(model=vad_model), x, chunk=SR)
    assert [(type(e), e.t) for e in small] == [(type(e), e.t) for e in large] and len(small) == 2
    np.testing.assert_array_equal(small[1].audio, large[1].audio)


def test_barge_in_is_reported_while_the_caller_is_still_speaking(speech, vad_model):
    utterance, v0, _ = speech[0]
    detector = VoiceActivityDetector(VadConfig(min_speech_ms=200), vad_model)
    events = _run(detector, np.concatenate([_noise(0.5), utterance[: SR]]))
    assert [type(e) for e in events] == [SpeechStarted] and detector.in_speech
    assert abs(events[0].t - (0.5 + v0)) < 0.15
    ended = detector.flush()  # the call hangs up mid-sentence
    assert len(ended) == 1 and ended[0].reason == "flush" and not detector.in_speech


def test_max_utterance_cuts_long_speech(speech, vad_model):
    utterance = speech[0][0]  # ~2.2 s of speech
    detector = VoiceActivityDetector(VadConfig(max_utterance_s=1.0, pre_roll_ms=0), vad_model)
    events = _run(detector, np.concatenate([_noise(0.5), utterance, _noise(1.0)]))
    cut = [e for e in events if isinstance(e, SpeechEnded) and e.reason == "max_length"]
    assert cut and abs(cut[0].t - cut[0].start - 1.0) < 0.04
    assert abs(cut[0].audio.size / SR - 1.0) < 0.04


def test_phone_path_mulaw_8k_to_vad(speech, vad_model):
    """What the gateway does with a phone call: mu-law 8 kHz frames -> float -> 16 kHz -> VAD."""
    utterance, v0, v1 = speech[1]
    wire = encode_audio(resample(np.concatenate([_noise(0.8), utterance, _noise(1.2)]), SR, 8000), "mulaw", 8000)
    up = StreamResampler(8000, SR)
    detector = VoiceActivityDetector(model=vad_model)
    events = []
    for i in range(0, len(wire), 160):  # 20 ms frames
        events += detector.process(up.process(decode_audio(wire[i : i + 160], "mulaw", 8000)))
    events += detector.process(up.flush()) + detector.flush()
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]
    # the resampler's filter delay (~66 ms) shifts both boundaries a little later
    assert abs(events[0].t - (0.8 + v0)) < 0.2 and abs(events[1].t - (0.8 + v1)) < 0.3


def test_vad_keeps_torch_thread_count_and_rejects_bad_input(vad_model):
    before = torch.get_num_threads()
    detector = VoiceActivityDetector(model=vad_model)
    detector.process(_noise(0.1))
    assert torch.get_num_threads() == before
    with pytest.raises(VadInputError, match="1-D float"):
        detector.process(np.zeros((2, 512), np.float32))
    with pytest.raises(VadInputError, match="NaN"):
        detector.process(np.array([0.0, np.nan], np.float32))


@pytest.mark.parametrize("kwargs, words", [
    ({"threshold": 1.5}, "threshold must be between 0 and 1"),
    ({"threshold": 0.5, "neg_threshold": 0.7}, "neg_threshold must be in"),
    ({"min_silence_ms": 10}, "min_silence_ms must be a whole number of ms in"),
    ({"min_speech_ms": 2.5}, "min_speech_ms"),
    ({"max_utterance_s": 0}, "max_utterance_s"),
])
def test_vad_config_errors(kwargs, words):
    with pytest.raises(VadConfigError, match=words):
        VadConfig(**kwargs)


def test_vad_config_takes_the_callers_overrides():
    cfg = VadConfig().with_options(threshold=0.6, min_silence_ms=None, min_speech_ms=100)
    assert (cfg.threshold, cfg.min_silence_ms, cfg.min_speech_ms) == (0.6, 500, 100)
    assert cfg.silence_threshold == pytest.approx(0.45)
    with pytest.raises(VadConfigError):
        VadConfig().with_options(min_silence_ms=-5)


# ---- decoder blocks ------------------------------------------------------------------------------

def test_chunk_presets_are_the_official_sizes():
    assert PRESETS["glm4voice"].sizes == (25, 50, 100, 150, 200)
    assert PRESETS["vita"].sizes == (10, 25, 50, 100, 150, 200)
    assert [PRESETS["vita"].size(i) for i in range(8)] == [10, 25, 50, 100, 150, 200, 200, 200]
    assert ChunkPlan.preset("GLM4Voice") is PRESETS["glm4voice"]
    assert ChunkPlan.parse("vita") is PRESETS["vita"] and ChunkPlan.parse("5, 7").sizes == (5, 7)


def test_chunker_cuts_blocks_as_they_fill_and_flush_gives_the_rest():
    chunker = TokenChunker(PRESETS["vita"])
    tokens = list(range(1000, 1000 + 700))
    blocks, returned_at = [], []
    for i, t in enumerate(tokens):
        block = chunker.push(t)
        if block is not None:
            blocks.append(block)
            returned_at.append(i + 1)
    assert [len(b) for b in blocks] == [10, 25, 50, 100, 150, 200]
    assert returned_at == [10, 35, 85, 185, 335, 535]  # each block the moment its last token arrives
    assert chunker.pending == 165 and chunker.next_size == 200
    rest = chunker.flush()
    assert len(rest) == 165 and sum(blocks, []) + rest == tokens
    assert chunker.pending == 0 and chunker.next_size == 10  # ready for the next turn


def test_chunker_agrees_with_the_decoders_block_split():
    from vitaserve.common.audio_facts import GLM4VOICE_BLOCKS as WEB_DEMO_BLOCKS
    from vitaserve.decoder.audio_decoder import split_blocks

    assert PRESETS["glm4voice"].sizes == WEB_DEMO_BLOCKS
    tokens = list(np.random.default_rng(0).integers(0, 16384, 437))
    chunker = TokenChunker(PRESETS["glm4voice"])
    assert chunker.extend(tokens) + [chunker.flush()] == split_blocks(tokens, WEB_DEMO_BLOCKS)


def test_turn_ending_on_a_block_boundary_still_gets_a_final_block():
    chunker = TokenChunker(ChunkPlan((4,)))
    assert chunker.extend(range(8)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunker.flush() == []  # decoded with finalize=True: the decoder vocodes what it held back
    assert chunker.extend([]) == [] and chunker.flush() == []


@pytest.mark.parametrize("sizes", [(), (0,), (25, -1), (True,), (2.5,), "25,50", None])
def test_chunk_plan_rejects_bad_sizes(sizes):
    with pytest.raises(ChunkPlanError, match="positive whole numbers"):
        ChunkPlan(sizes)


def test_chunker_rejects_bad_tokens_and_names_without_losing_state():
    chunker = TokenChunker(ChunkPlan((3,)))
    chunker.push(1)
    for bad in (-1, 1.5, "7", None, True):
        with pytest.raises(ChunkPlanError, match="audio token id"):
            chunker.push(bad)
    assert chunker.push(np.int64(2)) is None and chunker.push(3) == [1, 2, 3]
    with pytest.raises(ChunkPlanError, match="unknown chunk plan 'fast'"):
        ChunkPlan.preset("fast")
    with pytest.raises(ChunkPlanError, match="neither a preset"):
        ChunkPlan.parse("10,x")


def test_playback_slack_is_zero_before_audio_then_what_is_left_to_play():
    progress = AnswerProgress()
    assert progress.playback_slack_s(100.0) == 0.0  # the first block: someone is waiting
    progress.first_audio_at, progress.audio_sent_s = 100.0, 0.8  # 0.8 s sent at t = 100
    assert progress.playback_slack_s(100.3) == pytest.approx(0.5)
    progress.audio_sent_s += 2.0
    assert progress.playback_slack_s(101.0) == pytest.approx(1.8)
    assert progress.playback_slack_s(110.0) == 0.0  # ran dry: due now, never negative
