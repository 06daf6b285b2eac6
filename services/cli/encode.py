"""`vita-audio encode`: speech -> GLM-4-Voice audio token ids, offline (no services).

Reads a WAV file (PCM 8/16/24/32-bit or IEEE float, any rate, any channel count; channel 0 is
used as the official code does), tokenizes it, and prints the ids: `{"tokens": [...]}` with --json,
else comma-separated (the format `vita-audio decode --tokens` takes).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

from vitaserve.cli.main import CLIError


def subparser_init(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode",
        help="speech WAV -> audio token ids (GLM-4-Voice tokenizer)",
        description=(
            "Tokenize a WAV file with a GLM-4-Voice speech tokenizer folder (config.json, "
            "preprocessor_config.json, model.safetensors): 12.5 ids per second, each < 16384. "
            "16 kHz is the model rate; other rates are resampled (soxr)."
        ),
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. DIR/tokenizer from make-checkpoint)")
    p.add_argument("--in", dest="input", required=True, help="WAV file to tokenize")
    p.add_argument("--json", action="store_true", help='print {"tokens": [...]} instead of comma-separated ids')
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model dtype; bfloat16 is faster on GPUs but changes some tokens")
    p.set_defaults(func=cmd)


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


def cmd(args: argparse.Namespace) -> int:
    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    try:
        audio, rate = read_wav(path)
    except (ValueError, OSError) as exc:
        raise CLIError(f"{path}: {exc}") from None

    import torch

    from vitaserve.encoder.config import CheckpointError
    from vitaserve.encoder.tokenizer import SpeechTokenizer

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CLIError(f"--device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        tokenizer = SpeechTokenizer.from_pretrained(args.tokenizer, device=device, dtype=getattr(torch, args.dtype))
    except (CheckpointError, OSError) as exc:
        raise CLIError(str(exc)) from None
    try:
        tokens = tokenizer.encode([audio[0]], rate)[0]  # channel 0, as the official code
    except ValueError as exc:
        raise CLIError(f"{path}: {exc}") from None
    if args.json:
        print(json.dumps({"tokens": tokens}))
    else:
        print(",".join(map(str, tokens)))
    sys.stdout.flush()
    return 0
