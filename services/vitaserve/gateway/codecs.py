"""The caller's wire codecs: G.711 mu-law / A-law at 8 kHz and PCM16 little-endian, to and from float32.

G.711 is written from the ITU-T recommendation's segment tables (the same integer algorithm as the
reference `g711.c` that CPython's `audioop` carries): mu-law works on 14-bit magnitudes with a bias of
0x84 and inverts every bit, A-law works on 13-bit magnitudes and inverts the even bits (XOR 0x55).
Both directions are 256- and 65536-entry lookup tables built once, vectorised, at import, so
encoding or decoding a frame is one numpy indexing operation.

Float convention: int16 / 32768, so PCM16 -> float -> PCM16 is exact; on the way out, samples are
clipped to [-1, 1) (a vocoder overshoots a little) but NaN or inf are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitaserve.api import audio_pb2

PCM16, MULAW, ALAW = "pcm16", "mulaw", "alaw"
CODECS = (PCM16, MULAW, ALAW)
SUPPORTED_RATES: dict[str, tuple[int, ...]] = {
    PCM16: (8000, 16000, 24000, 48000),
    MULAW: (8000,),  # G.711 is defined at 8 kHz only
    ALAW: (8000,),
}
# Names telephony platforms use for the same codecs (SIP/RTP payload names, Twilio, Asterisk).
_ALIASES = {
    "pcm16": PCM16, "pcm": PCM16, "l16": PCM16, "linear16": PCM16, "s16le": PCM16, "slin": PCM16,
    "mulaw": MULAW, "ulaw": MULAW, "mu-law": MULAW, "pcmu": MULAW, "g711u": MULAW,
    "alaw": ALAW, "a-law": ALAW, "pcma": ALAW, "g711a": ALAW,
}
BYTES_PER_SAMPLE = {PCM16: 2, MULAW: 1, ALAW: 1}
# codec name <-> the wire enum of vita.audio.v1.AudioFormat (the gateway and its clients share it)
CODEC_ENUM = {PCM16: audio_pb2.AUDIO_CODEC_PCM16, MULAW: audio_pb2.AUDIO_CODEC_MULAW, ALAW: audio_pb2.AUDIO_CODEC_ALAW}


class AudioFormatError(ValueError):
    """Audio the gateway cannot take or produce; the message says what and why."""


class UnknownCodecError(AudioFormatError):
    pass


class UnsupportedRateError(AudioFormatError):
    pass


class PayloadError(AudioFormatError):
    """The bytes do not fit the codec (odd-length PCM16, wrong type)."""


class SampleValueError(AudioFormatError):
    """Samples to encode are not a finite 1-D float array."""


# ---- G.711 from the standard's segment end points ------------------------------------------------

_ULAW_BIAS = 0x84  # 132: added to the magnitude so that every segment starts at a power of two
_ULAW_CLIP = 8159  # largest 14-bit magnitude before the bias
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def ulaw_to_linear(codes: np.ndarray) -> np.ndarray:
    """mu-law code bytes -> int16 (0xFF and 0x7F -> 0, 0x00 -> -32124, 0x80 -> 32124)."""
    u = ~np.asarray(codes, dtype=np.uint8)
    u = u.astype(np.int32)
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def linear_to_ulaw(pcm: np.ndarray) -> np.ndarray:
    """int16 -> mu-law code bytes (the 16-bit value is first reduced to 14 bits, as G.711 specifies)."""
    v = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")  # first segment whose end >= mag
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


def alaw_to_linear(codes: np.ndarray) -> np.ndarray:
    """A-law code bytes -> int16 (0xD5 -> 8, 0x55 -> -8, 0xAA -> 32256, 0x2A -> -32256)."""
    a = np.asarray(codes, dtype=np.uint8).astype(np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def linear_to_alaw(pcm: np.ndarray) -> np.ndarray:
    """int16 -> A-law code bytes (the 16-bit value is first reduced to 13 bits, as G.711 specifies)."""
    v = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 3
    mask = np.where(v >= 0, 0xD5, 0x55)
    mag = np.where(v >= 0, v, -v - 1)  # one's complement magnitude: -1 and 0 share segment 0
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> shift) & 0x0F))
    return (code ^ mask).astype(np.uint8)


_ALL_CODES = np.arange(256, dtype=np.uint8)
_ALL_PCM = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
_ULAW_DECODE = ulaw_to_linear(_ALL_CODES)
_ALAW_DECODE = alaw_to_linear(_ALL_CODES)
# Encode tables are indexed by the int16 value's bit pattern viewed as uint16.
_ULAW_ENCODE = np.empty(65536, dtype=np.uint8)
_ULAW_ENCODE[_ALL_PCM.view(np.uint16)] = linear_to_ulaw(_ALL_PCM)
_ALAW_ENCODE = np.empty(65536, dtype=np.uint8)
_ALAW_ENCODE[_ALL_PCM.view(np.uint16)] = linear_to_alaw(_ALL_PCM)


# ---- PCM16 little-endian -------------------------------------------------------------------------

_LE_INT16 = np.dtype("<i2")


def unpack_pcm16(payload: bytes) -> np.ndarray:
    """Little-endian signed 16-bit bytes -> int16 array (native order)."""
    if len(payload) % 2:
        raise PayloadError(f"PCM16 payload has an odd number of bytes ({len(payload)}); "
                           "every sample is 2 bytes, little-endian")
    return np.frombuffer(payload, dtype=_LE_INT16).astype(np.int16)


def pack_pcm16(pcm: np.ndarray) -> bytes:
    """int16 array -> little-endian bytes, whatever the machine's byte order."""
    return np.asarray(pcm, dtype=np.int16).astype(_LE_INT16, copy=False).tobytes()


# ---- float <-> int16 -----------------------------------------------------------------------------

def to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1)."""
    return np.asarray(pcm, dtype=np.int16).astype(np.float32) * np.float32(1.0 / 32768.0)


def to_int16(samples: np.ndarray) -> np.ndarray:
    """float samples -> int16, rounding to nearest and clipping to the int16 range."""
    x = check_samples(samples)
    return np.clip(np.rint(x.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def check_samples(samples: np.ndarray) -> np.ndarray:
    """A 1-D float array of finite numbers, or SampleValueError."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise SampleValueError(f"audio samples must be a 1-D (mono) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise SampleValueError(f"audio samples must be floats in [-1, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x))[0])
        raise SampleValueError(f"audio samples must be finite; sample {bad} is {x[bad]}")
    return x


# ---- public API ----------------------------------------------------------------------------------

def check_format(codec: str, sample_rate: int) -> str:
    """The canonical codec name if (codec, sample_rate) is supported; AudioFormatError otherwise."""
    if not isinstance(codec, str):
        raise UnknownCodecError(f"codec must be a name such as {', '.join(CODECS)}; got {codec!r}")
    name = _ALIASES.get(codec.strip().lower())
    if name is None:
        raise UnknownCodecError(f"unknown codec {codec!r}; supported: {', '.join(CODECS)}")
    rates = SUPPORTED_RATES[name]
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or int(sample_rate) not in rates:
        raise UnsupportedRateError(
            f"{name} is supported at {', '.join(str(r) for r in rates)} Hz, not {sample_rate!r}")
    return name


@dataclass(frozen=True)
class OutputFormat:
    """A checked (canonical codec name, sample rate): how a call's or an answer's audio goes on the wire."""

    codec: str
    sample_rate: int


def payload_duration_s(payload_len: int, codec: str, sample_rate: int) -> float:
    """Seconds of audio in payload_len bytes (to compare arrival against real time)."""
    name = check_format(codec, sample_rate)
    return payload_len / BYTES_PER_SAMPLE[name] / sample_rate


def decode_audio(payload: bytes, codec: str, sample_rate: int) -> np.ndarray:
    """Wire bytes -> float32 samples in [-1, 1] at the same sample rate."""
    name = check_format(codec, sample_rate)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"audio payload must be bytes, got {type(payload).__name__}")
    if name == PCM16:
        return to_float(unpack_pcm16(bytes(payload)))
    codes = np.frombuffer(payload, dtype=np.uint8)
    return to_float((_ULAW_DECODE if name == MULAW else _ALAW_DECODE)[codes])


def encode_audio(samples: np.ndarray, codec: str, sample_rate: int) -> bytes:
    """float samples (clipped to [-1, 1]) -> wire bytes; the rate is checked, not changed."""
    name = check_format(codec, sample_rate)
    pcm = to_int16(samples)
    if name == PCM16:
        return pack_pcm16(pcm)
    table = _ULAW_ENCODE if name == MULAW else _ALAW_ENCODE
    return table[pcm.view(np.uint16)].tobytes()
