"""WAV files in and out: the one reader and writer the CLIs, the phone client and the tests share.

The reader takes PCM 8/16/24/32-bit, IEEE float and WAVE_FORMAT_EXTENSIBLE (the stdlib `wave` module
reads only integer PCM); the writer writes 16-bit PCM, or 32-bit float.
"""

from __future__ import annotations

import struct
from pathlib import Path

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: str | Path):
    """(samples (channels, frames) float32 in [-1, 1], sample rate). Raises ValueError on a bad file.

    Integer PCM is scaled as torchaudio.load scales it (x / 2^(bits-1); 8-bit is unsigned).
    """
    import numpy as np

    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file (no RIFF/WAVE header)")
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if chunk == b"fmt ":
            if len(body) < 16:
                raise ValueError("truncated fmt chunk")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
            fmt = (tag, channels, rate, bits)
        elif chunk == b"data":
            if fmt is None:
                raise ValueError("data chunk before fmt chunk")
            tag, channels, rate, bits = fmt
            if channels < 1 or rate < 1:
                raise ValueError(f"bad fmt chunk ({channels} channels, {rate} Hz)")
            width = bits // 8
            if tag == _FLOAT and bits in (32, 64):
                samples = np.frombuffer(body[: len(body) // width * width], dtype=f"<f{width}").astype(np.float32)
            elif tag == _PCM and bits == 8:
                samples = (np.frombuffer(body, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
            elif tag == _PCM and bits in (16, 32):
                raw = np.frombuffer(body[: len(body) // width * width], dtype=f"<i{width}")
                samples = (raw / float(2 ** (bits - 1))).astype(np.float32)
            elif tag == _PCM and bits == 24:
                b = np.frombuffer(body[: len(body) // 3 * 3], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
                raw = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24 bits
                samples = (raw / float(2**23)).astype(np.float32)
            else:
                raise ValueError(f"unsupported WAV encoding (format tag {tag}, {bits} bits)")
            frames = samples.size // channels
            if frames == 0:
                raise ValueError("the WAV file holds no audio")
            return samples[: frames * channels].reshape(frames, channels).T, rate
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    raise ValueError("no data chunk" if fmt else "no fmt chunk")


def write_wav(path, pcm, sample_rate: int = 22050, as_float: bool = False) -> None:
    """16-bit PCM via the stdlib wave module, or IEEE float (format 3), which wave cannot write."""
    import wave

    import numpy as np

    pcm = np.asarray(pcm, dtype=np.float32)
    if not as_float:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes((np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes())
        return
    data = pcm.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)
    fact = struct.pack("<I", pcm.shape[0])
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
    body += b"data" + struct.pack("<I", len(data)) + data
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)
