"""`vita-audio bench`: benchmarks that print a table and write one JSON object per run."""

from __future__ import annotations

import argparse

from vitaserve.generator.lm_options import LMLoadError, LMOptions


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (language model, engine, codec); JSON out",
                              description="Benchmarks. Each prints a table and, with --json, one JSON object.")
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)

    lm = sub.add_parser("lm", help="one call at a time: first audio chunk and tokens/s per mode",
                        description="Time to the first audio chunk (11th new token: 1 backbone + 10 MCTP tokens "
                                    "after a --prompt-len prompt) and tokens/s, per inference mode, greedy.")
    LMOptions.add_arguments(lm)
    lm.add_argument("--modes", default="vanilla,balance,boost,turbo")
    lm.add_argument("--prompt-len", type=int, default=32)
    lm.add_argument("--max-new-tokens", type=int, default=64)
    lm.add_argument("--repeats", type=int, default=3)
    _common(lm)
    lm.set_defaults(func=cmd_lm)

    eng = sub.add_parser("engine", help="the batching engine: N calls together",
                         description="N calls submitted together to the continuous-batching engine, each with its "
                                     "own random prompt, greedy: aggregate tokens/s and first-chunk p50/p95.")
    LMOptions.add_arguments(eng)
    eng.add_argument("--concurrency", type=int, default=16)
    eng.add_argument("--mode", default="boost")
    eng.add_argument("--prompt-len", type=int, default=32)
    eng.add_argument("--max-new-tokens", type=int, default=64)
    _common(eng)
    eng.set_defaults(func=cmd_engine)

    codec = sub.add_parser("codec", help="speech tokenizer and decoder speed",
                           description="Tokenizer ms per second of audio (5 s input), decoder time to first PCM and "
                                       "real-time factors, one shot and streamed; cross-stream batching of first "
                                       "blocks (batch 1, 2, 4, 8 against one by one).")
    codec.add_argument("--tokenizer", required=True)
    codec.add_argument("--decoder", required=True)
    codec.add_argument("--device", default="cpu")
    _common(codec)
    codec.set_defaults(func=cmd_codec)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", help="also write the JSON to this file")


def _print_table(table: list[dict]) -> None:
    if table:
        cols = list(table[0])
        print("  ".join(f"{c:>16}" for c in cols))
        for row in table:
            print("  ".join(f"{row[c]!s:>16}" for c in cols))


def _emit(args, result: dict, table: list[dict]) -> int:
    import json

    from vitaserve.common.provenance import git_commit

    result = {**result, "commit": git_commit()}
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _load(opts: LMOptions, num_slots: int = 1):
    from vitaserve.cli.main import CLIError

    try:
        return opts.load(num_slots)
    except LMLoadError as exc:
        raise CLIError(str(exc)) from exc


def _device_info(args) -> dict:
    import platform

    import torch

    if args.device.startswith("cuda"):
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    return {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__}


def cmd_lm(args) -> int:
    from vitaserve.generator.benchmark import bench_modes, modes_summary

    opts = LMOptions.from_args(args)
    lm = _load(opts)
    rows = bench_modes(lm, args.modes.split(","), args.prompt_len, args.max_new_tokens, args.repeats)
    result = {"bench": "lm", **_device_info(args), "dtype": opts.resolved_dtype, "checkpoint": str(args.lm),
              "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, "modes": rows,
              **modes_summary(lm, rows)}
    return _emit(args, result, rows)


def cmd_engine(args) -> int:
    from vitaserve.generator.benchmark import bench_engine

    opts = LMOptions.from_args(args)
    lm = _load(opts, num_slots=args.concurrency)
    row = bench_engine(lm, args.concurrency, args.mode, args.prompt_len, args.max_new_tokens)
    result = {"bench": "engine", **_device_info(args), "dtype": opts.resolved_dtype, "checkpoint": str(args.lm),
              "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, **row}
    return _emit(args, result, [row])


def cmd_codec(args) -> int:
    from vitaserve.decoder.benchmark import run_codec_benchmark

    row = run_codec_benchmark(args.tokenizer, args.decoder, device=args.device)
    if not args.json:  # one table of the scalar figures, then one of cross-stream batching
        _print_table([{k: v for k, v in row.items() if k != "decoder_batch"}])
        print()
    return _emit(args, {"bench": "codec", **_device_info(args), **row}, row["decoder_batch"])
