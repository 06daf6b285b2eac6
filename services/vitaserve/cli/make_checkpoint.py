"""`vita-audio make-checkpoint`: random-weight folders in the official file formats."""

from __future__ import annotations

import argparse

from vitaserve.devcluster.checkpoints import PARTS, PRESETS


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
        choices=PARTS,
        action="append",
        help="write only these parts (repeatable); default all three",
    )
    p.set_defaults(func=cmd)


def cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitaserve.devcluster.checkpoints import write_part

    out = Path(args.out)
    for part in PARTS:
        if part in (args.only or PARTS):
            write_part(out / part, part, args.preset, seed=args.seed)
            print(f"wrote {out / part}")
    return 0
