"""Hypothesis strategies for every API's messages, hostile values included.

Each strategy mixes values a correct client sends (so inputs get past validation and reach the
encoder, Triton and the decoder) with values a broken or hostile one sends: unknown enum values,
NaN / inf / subnormal / huge floats, negative and huge ints, garbage audio bytes of odd lengths,
unsupported codec and rate pairs, long strings within the message size limit, text full of control
characters and chat-template tokens, and for the streams any order of messages (config twice, audio
before config, unknown controls).

Sizes are bounded so that one input costs at most a short answer on a 2-core machine: answers the
fuzzer asks for are at most MAX_FUZZ_ANSWER tokens; bigger max_new_tokens values are the hostile
ones the gateway must refuse (they exceed the context).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from vitaserve.api import audio_pb2, conversation_pb2 as pb, decoder_pb2, encoder_pb2

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
MAX_FUZZ_ANSWER = 24  # tokens: a valid answer the fuzzer asks for stays short (cost, not coverage)
SPEECH_RATE = 8000


@st.composite
def hostile_fields(draw, names: tuple[str, ...]) -> set[str]:
    """Which fields of a message get hostile values: none (so the input reaches the backends), one
    (so each check is met alone), or any subset."""
    how = draw(st.sampled_from(["none", "none", "one", "one", "one", "any"]))
    if how == "none":
        return set()
    if how == "one":
        return {draw(st.sampled_from(names))}
    return set(draw(st.sets(st.sampled_from(names))))

# ---- scalars -----------------------------------------------------------------------------------------

HOSTILE_FLOATS = st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e-38, -1e-45,
                                  3.4028235e38, -3.4028235e38, 1e30, 2.0**-149, 0.99999994, 1.0000001])
# float32 fields: every finite float32, plus the hostile ones above
FLOAT32 = st.one_of(HOSTILE_FLOATS, st.floats(width=32, allow_nan=True, allow_infinity=True),
                    st.floats(0.0, 2.0, width=32))
DOUBLE = st.one_of(HOSTILE_FLOATS, st.floats(allow_nan=True, allow_infinity=True), st.floats(0.0, 10.0))
SMALL_OR_HOSTILE_INT32 = st.one_of(st.integers(-3, 64), st.sampled_from([-(2**31), 2**31 - 1, 1 << 20, 4096, 1024]),
                                   INT32)

CODEC = st.one_of(st.sampled_from([audio_pb2.AUDIO_CODEC_UNSPECIFIED, audio_pb2.AUDIO_CODEC_PCM16,
                                   audio_pb2.AUDIO_CODEC_MULAW, audio_pb2.AUDIO_CODEC_ALAW]),
                  st.integers(4, 1000), st.integers(-(2**31), -1))  # unknown enum values reach the server
RATE = st.one_of(st.sampled_from([8000, 16000, 24000, 48000]),  # the supported ones
                 st.sampled_from([0, -8000, 1, 11025, 22050, 44100, 96000, 2**31 - 1, -(2**31)]), INT32)


SUPPORTED_FORMAT_PAIRS = [(audio_pb2.AUDIO_CODEC_MULAW, 8000), (audio_pb2.AUDIO_CODEC_ALAW, 8000),
                          (audio_pb2.AUDIO_CODEC_PCM16, 8000), (audio_pb2.AUDIO_CODEC_PCM16, 16000),
                          (audio_pb2.AUDIO_CODEC_PCM16, 24000), (audio_pb2.AUDIO_CODEC_PCM16, 48000)]


@st.composite
def audio_format(draw, hostile: bool | None = None) -> audio_pb2.AudioFormat:
    """A supported pair (so audio gets through), or (hostile) any codec enum value and rate."""
    if hostile is None:
        hostile = draw(st.booleans())
    if not hostile:
        codec, rate = draw(st.sampled_from(SUPPORTED_FORMAT_PAIRS))
        return audio_pb2.AudioFormat(codec=codec, sample_rate=rate)
    return audio_pb2.AudioFormat(codec=draw(CODEC), sample_rate=draw(RATE))


# ---- text --------------------------------------------------------------------------------------------

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|audio_0|>",
               "<|audio_16383|>", "<|audio_16384|>", "<|audio_-1|>", "<|endoftext|>", "<|im_start|>system\n"]
ODD_TEXT = st.sampled_from(["", " ", "\n\t\r", "\x00", "\x00" * 64, "\ufeff", "\u202e\u202d", "\U0001f600" * 8,
                            "\ue000\uf8ff", "\u0301" * 50, "a\u0000b", "\x7f\x80\x9f", "\uffff\ufffe",
                            "Z\u0351\u0360\u0489" * 20, "😀" * 3000, "\u4f60\u597d"])
TEXT = st.one_of(
    st.text(max_size=40),  # any code point Python can put in a proto string (surrogates excluded)
    st.text(st.characters(codec="utf-8"), max_size=200),
    ODD_TEXT,
    st.lists(st.sampled_from(CHAT_TOKENS + ["hello", " ", "\n"]), max_size=30).map("".join),
    st.sampled_from(["Hello there.", "What is the weather like today?", "one two three"]),
)


@st.composite
def long_text(draw, max_chars: int = 200_000) -> str:
    """A long string (within the 1 MiB message limit even in 4-byte UTF-8): one character repeated,
    or a chat-template token repeated (expensive for a tokenizer if anything is)."""
    unit = draw(st.sampled_from(["a", "ab ", "\u4f60", "😀", "<|im_end|>", "<|audio_5|>", "\n", "1,"]))
    n = draw(st.integers(1, max_chars // len(unit)))
    return unit * n


ANY_TEXT = st.one_of(TEXT, TEXT, TEXT, long_text())


# ---- modes -------------------------------------------------------------------------------------------

MODE = st.one_of(
    st.sampled_from(["", "vanilla", "balance", "boost", "turbo", "VANILLA", " boost ", "unknown", "1,10,4,10",
                     "1,1,1000000000000,1", "1,-1", "0,1", "1,10,0,0", "1,1,", ",", "1.5,2", "nan,1", "1e9,1",
                     "１,１０"]),  # full-width digits
    st.lists(st.integers(-2, 12), max_size=12).map(lambda xs: ",".join(map(str, xs))),
    st.lists(st.integers(-(2**63), 2**64), min_size=1, max_size=6).map(lambda xs: ",".join(map(str, xs))),
    st.integers(1, 2000).map(lambda n: "1," * n + "1"),
    TEXT,
)


# ---- sampling options --------------------------------------------------------------------------------

SANE_SAMPLING = {"temperature": st.floats(0.05, 2.0), "top_p": st.floats(0.01, 1.0),
                 "repetition_penalty": st.floats(0.5, 2.0), "top_k": st.integers(0, 100), "seed": st.integers(0, 1000)}
HOSTILE_SAMPLING = {"temperature": FLOAT32, "top_p": FLOAT32, "repetition_penalty": FLOAT32, "top_k": INT32,
                    "seed": INT64}


@st.composite
def sampling(draw, hostile: bool | None = None) -> audio_pb2.SamplingOptions:
    """Unset fields keep the checkpoint's values; set ones are in range, or (hostile) anything."""
    if hostile is None:
        hostile = draw(st.integers(0, 2)) == 0
    fields = {}
    if draw(st.booleans()):
        fields["greedy"] = draw(st.booleans())
    for name in SANE_SAMPLING:
        if draw(st.integers(0, 2)) == 0:
            fields[name] = draw(HOSTILE_SAMPLING[name] if hostile else SANE_SAMPLING[name])
    return audio_pb2.SamplingOptions(**fields)


MAX_NEW_TOKENS = st.integers(1, MAX_FUZZ_ANSWER)
HOSTILE_MAX_NEW_TOKENS = st.one_of(st.sampled_from([-1, -(2**31), 1023, 1024, 4096, 2**31 - 1]),
                                   st.integers(1025, 2**31 - 1), st.integers(-(2**31), -1))
SANE_MODE = st.sampled_from(["", "vanilla", "balance", "boost", "turbo", "1,10,4,10", "1,1", "2,10,1,10"])
SANE_TEXT = st.one_of(st.sampled_from(["Hello there.", "What is the weather like today?", "one two three"]),
                      st.text(st.characters(codec="utf-8"), min_size=1, max_size=60))


# ---- audio bytes -------------------------------------------------------------------------------------

def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Voiced-ish float samples at SPEECH_RATE: a few harmonics with a syllable envelope, plus noise.
    Good enough to pass a VAD and give the encoder real work; no fixture needed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SPEECH_RATE)) / SPEECH_RATE
    f0 = 110 + 40 * rng.random()
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.random() * 6) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.25 * x * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


GARBAGE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1, max_size=4001).filter(lambda b: len(b) % 2 == 1),  # odd lengths
    st.integers(0, 70_000).map(lambda n: b"\x00" * n),  # around the 64 KiB frame limit
    st.integers(0, 9000).map(lambda n: b"\x7f\xff" * n),  # full scale
    st.sampled_from([b"", b"\x00", b"\xff" * 160, b"\x80\x00" * 160, b"RIFF\x24\x08\x00\x00WAVEfmt "]),
)


@st.composite
def frame_bytes(draw, fmt: audio_pb2.AudioFormat | None, speech: bool = False) -> bytes:
    """One AudioFrame's data: speech-like samples in the call's format, or garbage (never when
    `speech` and the format is a supported one)."""
    from vitaserve.gateway.codecs import CODEC_ENUM, encode_audio

    names = {v: k for k, v in CODEC_ENUM.items()}
    if fmt is not None and fmt.codec in names and fmt.sample_rate in (8000, 16000, 24000, 48000) \
            and (speech or draw(st.integers(0, 2)) > 0):
        from vitaserve.common.resample import resample

        seconds = draw(st.sampled_from([0.02, 0.1, 0.2, 0.2, 0.5]))
        if draw(st.integers(0, 3)) == 0:  # silence: lets a VAD call end an utterance by itself
            x = np.zeros(int(seconds * SPEECH_RATE), np.float32)
        else:
            x = speech_like(seconds, draw(st.integers(0, 3)))
        if fmt.sample_rate != SPEECH_RATE:
            x = resample(x, SPEECH_RATE, fmt.sample_rate)
        try:
            return encode_audio(x, names[fmt.codec], fmt.sample_rate)
        except ValueError:  # an unsupported pair for this codec: garbage it is
            pass
    return draw(GARBAGE_BYTES)


# ---- Converse ----------------------------------------------------------------------------------------

CONFIG_FIELDS = ("input_format", "output_format", "mode", "system_prompt", "session_id", "sampling", "vad",
                 "max_new_tokens")


@st.composite
def call_config(draw) -> pb.CallConfig:
    bad = draw(hostile_fields(CONFIG_FIELDS))
    fields = dict(input_format=draw(audio_format("input_format" in bad)))
    if "output_format" in bad or draw(st.booleans()):
        fields["output_format"] = draw(audio_format("output_format" in bad))
    if "mode" in bad or draw(st.integers(0, 2)) == 0:
        fields["mode"] = draw(MODE if "mode" in bad else SANE_MODE)
    if "system_prompt" in bad or draw(st.integers(0, 3)) == 0:
        fields["system_prompt"] = draw(ANY_TEXT if "system_prompt" in bad else SANE_TEXT)
    if "session_id" in bad:  # a live session's id is unguessable: these name none
        fields["session_id"] = draw(st.one_of(TEXT, st.uuids().map(str), st.uuids().map(lambda u: u.hex)))
    if "sampling" in bad or draw(st.booleans()):
        fields["sampling"] = draw(sampling("sampling" in bad))
    if "vad" in bad or draw(st.integers(0, 3)) == 0:
        hostile = "vad" in bad
        vad = {}
        if draw(st.booleans()):
            vad["threshold"] = draw(FLOAT32 if hostile else st.floats(0.05, 0.95))
        if draw(st.booleans()):
            vad["min_silence_ms"] = draw(SMALL_OR_HOSTILE_INT32 if hostile else st.integers(100, 1500))
        if draw(st.booleans()):
            vad["min_speech_ms"] = draw(SMALL_OR_HOSTILE_INT32 if hostile else st.integers(50, 500))
        fields["vad"] = pb.VadOptions(**vad)
    fields["push_to_talk"] = draw(st.booleans())
    # never 0 (the server default, the whole context): too long an answer for a fuzzer's budget
    fields["max_new_tokens"] = draw(HOSTILE_MAX_NEW_TOKENS if "max_new_tokens" in bad else MAX_NEW_TOKENS)
    return pb.CallConfig(**fields)


SANE_CONTROL = st.sampled_from([pb.Control.END_OF_UTTERANCE, pb.Control.END_OF_UTTERANCE, pb.Control.CANCEL,
                                pb.Control.HANG_UP])
HOSTILE_CONTROL = st.one_of(st.just(pb.Control.ACTION_UNSPECIFIED), st.integers(4, 2**31 - 1),
                            st.integers(-(2**31), -1))  # unknown enum values reach the server as ints


@st.composite
def playback_progress(draw) -> pb.PlaybackProgress:
    """A report a real client could send (early turns and chunks, a second or two played), or
    (hostile) any turn, seq and played_s: negative, huge, NaN, infinite, a turn not begun."""
    bad = draw(hostile_fields(("turn", "seq", "played_s")))
    return pb.PlaybackProgress(turn=draw(SMALL_OR_HOSTILE_INT32 if "turn" in bad else st.integers(1, 3)),
                               seq=draw(SMALL_OR_HOSTILE_INT32 if "seq" in bad else st.integers(0, 8)),
                               played_s=draw(DOUBLE if "played_s" in bad else st.floats(0.0, 2.0)))


@st.composite
def converse_stream(draw) -> tuple[list[pb.ConverseRequest], list[float], str]:
    """(messages, pause before each in seconds, how the client ends: half_close | hang_up | cancel).

    Usually a config first (so the rest is exercised), then audio frames, controls and playback
    reports (true or not, of any turn) in any order;
    sometimes no config, a config later, or twice. Audio stays under the gateway's real-time
    allowance most of the time, so turns get answered."""
    messages: list[pb.ConverseRequest] = []
    config = draw(call_config())
    order = draw(st.sampled_from(["config first"] * 6 + ["no config", "config later", "config twice"]))
    if order != "no config" and order != "config later":
        messages.append(pb.ConverseRequest(config=config))
    fmt = config.input_format if order != "no config" else None
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 5)) == 0:
            messages.append(pb.ConverseRequest(playback=draw(playback_progress())))
        elif draw(st.integers(0, 4)) == 0:
            hostile = draw(st.integers(0, 5)) == 0
            messages.append(pb.ConverseRequest(control=pb.Control(action=draw(HOSTILE_CONTROL if hostile
                                                                              else SANE_CONTROL))))
        else:
            messages.append(pb.ConverseRequest(audio=pb.AudioFrame(data=draw(frame_bytes(fmt)))))
    if order in ("config later", "config twice"):
        at = draw(st.integers(0 if order == "config later" else 1, len(messages)))
        messages.insert(at, pb.ConverseRequest(config=draw(st.one_of(st.just(config), call_config()))))
    if draw(st.booleans()):
        messages.append(pb.ConverseRequest(control=pb.Control(action=pb.Control.END_OF_UTTERANCE)))
    if draw(st.integers(0, 9)) == 0:
        messages.append(pb.ConverseRequest())  # no oneof field set at all
    pauses = [draw(st.sampled_from([0.0, 0.0, 0.0, 0.0, 0.01, 0.05])) for _ in messages]
    end = draw(st.sampled_from(["half_close", "hang_up", "hang_up", "cancel"]))
    return messages, pauses, end


# ---- Synthesize, Transcribe ----------------------------------------------------------------------------

@st.composite
def synthesize_request(draw) -> pb.SynthesizeRequest:
    bad = draw(hostile_fields(("text", "max_new_tokens", "output_format", "mode", "sampling")))
    fields = dict(text=draw(ANY_TEXT if "text" in bad else SANE_TEXT),
                  max_new_tokens=draw(HOSTILE_MAX_NEW_TOKENS if "max_new_tokens" in bad else MAX_NEW_TOKENS))
    if "output_format" in bad or draw(st.booleans()):
        fields["output_format"] = draw(audio_format("output_format" in bad))
    if "mode" in bad or draw(st.integers(0, 2)) == 0:
        fields["mode"] = draw(MODE if "mode" in bad else SANE_MODE)
    if "sampling" in bad or draw(st.booleans()):
        fields["sampling"] = draw(sampling("sampling" in bad))
    return pb.SynthesizeRequest(**fields)


@st.composite
def transcribe_request(draw) -> pb.TranscribeRequest:
    bad = draw(hostile_fields(("audio", "format", "sampling")))
    fmt = draw(audio_format("format" in bad))
    if "audio" in bad:
        audio = draw(st.one_of(GARBAGE_BYTES, st.integers(0, 999_000).map(lambda n: b"\x55" * n)))
    else:
        audio = b"".join(draw(frame_bytes(fmt, speech=True)) for _ in range(draw(st.integers(1, 4))))
    fields = dict(audio=audio, format=fmt)
    if "sampling" in bad or draw(st.booleans()):
        fields["sampling"] = draw(sampling("sampling" in bad))
    return pb.TranscribeRequest(**fields)


# ---- internal: Encoder, Decoder ----------------------------------------------------------------------

@st.composite
def encode_request(draw) -> encoder_pb2.EncodeRequest:
    bad = draw(hostile_fields(("pcm16", "sample_rate")))
    rate = draw(RATE if "sample_rate" in bad else st.sampled_from([8000, 16000, 22050, 24000, 44100, 48000]))
    if "pcm16" not in bad:
        x = speech_like(draw(st.sampled_from([0.05, 0.3, 1.0])), draw(st.integers(0, 3)))
        pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    else:
        pcm = draw(GARBAGE_BYTES)
    return encoder_pb2.EncodeRequest(pcm16=pcm, sample_rate=rate)


STREAM_ID = st.one_of(st.uuids().map(lambda u: f"fuzz-{u.hex}:1"), TEXT,
                      st.sampled_from(["", ":", "a" * 129, "x.prev", "fuzz:prev", "ok-id\n", "ok id", "*", "{a}"]))
TOKENS = st.one_of(st.lists(st.integers(0, 16383), max_size=30),
                   st.lists(st.integers(-(2**31), 2**31 - 1), max_size=30),
                   st.integers(0, 420).map(lambda n: [7] * n))


@st.composite
def decode_block_request(draw, stream_id: str, seq: int) -> decoder_pb2.DecodeBlockRequest:
    """Block `seq` of a stream (the caller's count), or with hostile fields."""
    bad = draw(hostile_fields(("seq", "tokens", "ode_steps", "playback_slack_s")))
    return decoder_pb2.DecodeBlockRequest(
        stream_id=stream_id,
        seq=draw(SMALL_OR_HOSTILE_INT32) if "seq" in bad else seq,
        tokens=draw(TOKENS if "tokens" in bad else st.lists(st.integers(0, 16383), min_size=6, max_size=40)),
        finalize=draw(st.sampled_from([False, False, False, True])),
        ode_steps=draw(SMALL_OR_HOSTILE_INT32 if "ode_steps" in bad else st.integers(0, 3)),
        playback_slack_s=draw(DOUBLE if "playback_slack_s" in bad else st.floats(0.0, 5.0)))


@st.composite
def decoder_session(draw) -> list:
    """DecodeBlock and EndStream requests on one stream id: blocks in sequence, or repeated
    (a retry), skipped, after finalize, after EndStream; any field hostile."""
    hostile_id = draw(st.integers(0, 4)) == 0
    stream_id = draw(STREAM_ID if hostile_id else st.uuids().map(lambda u: f"fuzz-{u.hex}:1"))
    steps, seq = [], 0
    for _ in range(draw(st.integers(1, 5))):
        action = draw(st.sampled_from(["next", "next", "next", "retry", "skip", "end_stream"]))
        if action == "end_stream":
            steps.append(decoder_pb2.EndStreamRequest(stream_id=stream_id))
            continue
        block_seq = {"next": seq, "retry": max(seq - 1, 0), "skip": seq + 2}[action]
        steps.append(draw(decode_block_request(stream_id, block_seq)))
        seq += action == "next"
    return steps
