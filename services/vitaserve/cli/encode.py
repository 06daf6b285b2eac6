"""`vita-audio encode`: speech -> GLM-4-Voice audio token ids, offline (no services).

Reads a WAV file (PCM 8/16/24/32-bit or IEEE float, any rate, any channel count; channel 0 is
used as the official code does), tokenizes it, and prints the ids: `{"tokens": [...]}` with --json,
else comma-separated (the format `vita-audio decode --tokens` takes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitaserve.cli.main import CLIError
from vitaserve.common.wav import read_wav


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


def cmd(args: argparse.Namespace) -> int:
    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    try:
        audio, rate = read_wav(path)
    except (ValueError, OSError) as exc:
        raise CLIError(f"{path}: {exc}") from None

    import torch

    from vitaserve.common.checkpoint_errors import CheckpointError
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
