"""`vita-audio make-checkpoint`: random-weight folders in the official file formats."""

from __future__ import annotations

import argparse

PRESETS = ("tiny", "mini", "7b")
# The speech codec has two sizes: tiny (tests) and released (benchmarks). The mini LM is the
# CPU benchmark shape, so it comes with the released codec sizes, as 7b does.
CODEC_PRESET = {"tiny": "tiny", "mini": "released", "7b": "released"}


def subparser_init(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-checkpoint",
        help="write random-weight checkpoints in the official formats",
        description=(
            "Write DIR/lm (VITA-Audio: config.json, generation_config.json, tokenizer files, "
            "sharded safetensors), DIR/tokenizer (GLM-4-Voice speech tokenizer: config.json, "
            "preprocessor_config.json, safetensors) and DIR/decoder (GLM-4-Voice decoder: "
            "config.yaml, flow.pt, hift.pt), all with random weights. tiny: a few MB, for tests "
            "and the embedded default; mini: the 228 M-parameter CPU benchmark LM (real 168072 "
            "vocabulary) with the released codec sizes; 7b: the released shapes (GPU timing only)."
        ),
    )
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--out", required=True, help="folder to create (lm/, tokenizer/, decoder/ inside)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--only",
        choices=("lm", "tokenizer", "decoder"),
        action="append",
        help="write only these parts (repeatable); default all three",
    )
    p.set_defaults(func=cmd)


def cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    parts = args.only or ["lm", "tokenizer", "decoder"]
    if "lm" in parts:
        from vitaserve.generator.checkpoint import write_lm_checkpoint

        write_lm_checkpoint(out / "lm", args.preset, seed=args.seed)
        print(f"wrote {out / 'lm'}")
    if "tokenizer" in parts:
        from vitaserve.encoder.checkpoint import write_tokenizer_checkpoint

        write_tokenizer_checkpoint(out / "tokenizer", CODEC_PRESET[args.preset], seed=args.seed)
        print(f"wrote {out / 'tokenizer'}")
    if "decoder" in parts:
        from vitaserve.decoder.checkpoint import write_decoder_checkpoint

        write_decoder_checkpoint(out / "decoder", CODEC_PRESET[args.preset], seed=args.seed)
        print(f"wrote {out / 'decoder'}")
    return 0
