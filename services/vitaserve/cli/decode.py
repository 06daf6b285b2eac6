"""`vita-audio decode`: audio token ids -> 22.05 kHz WAV with the GLM-4-Voice decoder, offline."""

from __future__ import annotations

import argparse

from vitaserve.common.audio_facts import DECODER_RATE, GLM4VOICE_BLOCKS
from vitaserve.common.wav import write_wav

DEFAULT_CHUNKS = ",".join(map(str, GLM4VOICE_BLOCKS))  # GLM-4-Voice web demo blocks, the last size repeating


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "decode",
        help="decode audio token ids to a WAV (GLM-4-Voice flow + HiFT, no services)",
        description=(
            "Decode GLM-4-Voice audio token ids (0..16383) to a 22050 Hz WAV. One shot by default; with "
            "--stream, block by block with the official caches exactly as the decoder service does (the "
            "last block is always finalized); with --vita-redecode, VITA-Audio's streaming demo instead "
            "(each chunk re-decodes every token so far, ODE steps 1, 3, 5, ... up to 10). Modules run in "
            "eval mode; --deterministic makes every random draw zero."
        ),
    )
    p.add_argument("--decoder", required=True, help="decoder folder: config.yaml, flow.pt, hift.pt")
    p.add_argument("--tokens", required=True, help="comma-separated audio token ids, e.g. 1,2,3")
    p.add_argument("--out", required=True, help="WAV file to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true", help="decode block by block with the official caches")
    mode.add_argument("--vita-redecode", action="store_true",
                      help="VITA-Audio web_demo_stream.py: re-decode everything per chunk")
    p.add_argument("--chunk-sizes", default=DEFAULT_CHUNKS,
                   help=f"block sizes in tokens, the last repeating (default {DEFAULT_CHUNKS})")
    p.add_argument("--ode-steps", type=int, default=None,
                   help="flow Euler steps for every block (option_steps; default 10, or the VITA schedule)")
    p.add_argument("--deterministic", action="store_true", help="zero noise: reproducible sample by sample")
    p.add_argument("--seed", type=int, default=42, help="seed of the stream's generator (official: 42)")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


def parse_int_list(text: str, what: str) -> list[int]:
    from vitaserve.cli.main import CLIError

    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CLIError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{what} is empty")
    return values


def cmd(args: argparse.Namespace) -> int:
    import json
    import time

    import numpy as np
    import torch

    from vitaserve.cli.main import CLIError
    from vitaserve.decoder.audio_decoder import AudioDecoder, check_tokens, split_blocks

    try:
        tokens = check_tokens(parse_int_list(args.tokens, "--tokens"))
    except ValueError as exc:
        raise CLIError(f"--tokens: {exc}") from None
    chunk_sizes = parse_int_list(args.chunk_sizes, "--chunk-sizes")
    if any(c <= 0 for c in chunk_sizes):
        raise CLIError(f"--chunk-sizes must be positive, got {args.chunk_sizes}")
    if args.ode_steps is not None and args.ode_steps <= 0:
        raise CLIError("--ode-steps must be positive")
    try:
        decoder = AudioDecoder.from_pretrained(args.decoder, device=args.device, dtype=getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None

    t0 = time.perf_counter()
    chunks, chunk_ms = [], []
    try:
        if args.stream or args.vita_redecode:
            mode = "vita_redecode" if args.vita_redecode else "official"
            blocks = split_blocks(tokens, chunk_sizes)
            state = decoder.start_stream(mode=mode, deterministic=args.deterministic, seed=args.seed)
            for i, block in enumerate(blocks):
                pcm, state = decoder.decode_chunk(state, block, finalize=i == len(blocks) - 1,
                                                  ode_steps=args.ode_steps)
                chunks.append(pcm)
                chunk_ms.append(round((time.perf_counter() - t0) * 1000, 1))
        else:
            chunks.append(decoder.decode(tokens, ode_steps=args.ode_steps or 10,
                                         deterministic=args.deterministic, seed=args.seed))
            chunk_ms.append(round((time.perf_counter() - t0) * 1000, 1))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    write_wav(args.out, pcm, DECODER_RATE, as_float=args.float)
    audio_s = pcm.shape[0] / DECODER_RATE
    wall_s = time.perf_counter() - t0
    result = {
        "out": str(args.out), "tokens": len(tokens), "samples": int(pcm.shape[0]), "audio_s": round(audio_s, 3),
        "chunks": [int(c.shape[0]) for c in chunks], "chunk_done_ms": chunk_ms,
        "wall_s": round(wall_s, 3), "rtf": round(wall_s / audio_s, 3) if audio_s > 0 else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {args.out}: {result['samples']} samples ({audio_s:.2f} s) from {len(tokens)} tokens "
              f"in {len(chunks)} chunk(s), {wall_s:.2f} s (real-time factor {result['rtf']})")
    return 0
