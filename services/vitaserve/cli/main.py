"""The one `vita-audio` entry point.

Each subcommand lives in its own module with `subparser_init(subparsers)` and `cmd(args)`;
heavy imports (torch, grpc) happen inside `cmd`, so `vita-audio --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module name inside vitaserve.cli, in the order --help lists them
SUBCOMMANDS = [
    "make_checkpoint",
    "generate",
    "encode",
    "decode",
    "bench",
    "serve",
    "up",
    "call",
    "loadtest",
    "faults",
    "apikey",
]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vita-audio",
        description="Serve and debug the VITA-Audio speech-to-speech model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"vitaserve.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet in this checkout
            if exc.name == f"vitaserve.cli.{name}":
                continue
            raise
        module.subparser_init(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"vita-audio {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
