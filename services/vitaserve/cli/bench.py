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

    eng = sub.add_parser("engine", help="the batching engine: N calls together, or calls joining N-1 running",
                         description="The continuous-batching engine under N calls, each with its own random prompt, "
                                     "greedy, beside a lone call's first chunk (11th new token) in the same run. "
                                     "together: N calls submitted at once; tokens/s of all, first chunk p50/p95/max. "
                                     "staggered: N-1 calls run, and --joiners calls join them one after another at "
                                     "random (seeded) engine steps; the joiners' first chunk apart from the running "
                                     "calls', and each running call's tokens/s against real time (12.5/s).")
    LMOptions.add_arguments(eng)
    eng.add_argument("--concurrency", type=int, default=16, help="calls in the batch (a joiner included)")
    eng.add_argument("--mode", default="boost")
    eng.add_argument("--prompt-len", type=int, default=32)
    eng.add_argument("--max-new-tokens", type=int, default=64)
    eng.add_argument("--arrival", choices=["together", "staggered"], default="together")
    eng.add_argument("--joiners", type=int, default=4, help="staggered: calls that join, one after another")
    eng.add_argument("--max-gap-steps", type=int, default=8,
                     help="staggered: a joiner arrives 0..this many engine steps after the previous one ended")
    eng.add_argument("--seed", type=int, default=0, help="prompts and arrival steps")
    eng.add_argument("--sampling", choices=["greedy", "checkpoint"], default="greedy",
                     help="greedy (as the official comparison), or the checkpoint's generation_config sampling "
                          "(what callers get by default), seeded per call")
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
    if len(table) == 1 and len(table[0]) > 6:  # one wide row reads better as one figure per line
        width = max(len(k) for k in table[0])
        for k, v in table[0].items():
            print(f"{k:<{width}}  {v}")
        return
    if table:
        cols = list(table[0])
        print("  ".join(f"{c:>16}" for c in cols))
        for row in table:
            print("  ".join(f"{row[c]!s:>16}" for c in cols))


def _emit(args, result: dict, table: list[dict]) -> int:
    """Print the table (or the JSON) and write the JSON; both carry the machine and the commit."""
    import json

    from vitaserve.common.provenance import provenance

    result = {**result, **provenance(getattr(args, "device", "cpu"))}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"# {result.get('gpu') or result['cpu_model']}, {result['torch_threads']} torch threads, "
              f"torch {result['torch']}, commit {result['commit']}")
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


def cmd_lm(args) -> int:
    from vitaserve.generator.benchmark import bench_modes, modes_summary

    opts = LMOptions.from_args(args)
    lm = _load(opts)
    rows = bench_modes(lm, args.modes.split(","), args.prompt_len, args.max_new_tokens, args.repeats)
    result = {"bench": "lm", "dtype": opts.resolved_dtype, "checkpoint": str(args.lm),
              "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, "modes": rows,
              **modes_summary(lm, rows)}
    return _emit(args, result, rows)


def cmd_engine(args) -> int:
    from vitaserve.cli.main import CLIError
    from vitaserve.generator.benchmark import bench_engine

    opts = LMOptions.from_args(args)
    lm = _load(opts, num_slots=args.concurrency)
    try:
        row = bench_engine(lm, args.concurrency, args.mode, args.prompt_len, args.max_new_tokens, seed=args.seed,
                           arrival=args.arrival, joiners=args.joiners, max_gap_steps=args.max_gap_steps,
                           sampling=args.sampling)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    result = {"bench": "engine", "dtype": opts.resolved_dtype, "checkpoint": str(args.lm),
              "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, **row}
    return _emit(args, result, [{k: v for k, v in row.items() if not isinstance(v, (list, dict))}])


def cmd_codec(args) -> int:
    from vitaserve.decoder.benchmark import run_codec_benchmark

    row = run_codec_benchmark(args.tokenizer, args.decoder, device=args.device)
    if not args.json:  # one table of the scalar figures, then one of cross-stream batching
        _print_table([{k: v for k, v in row.items() if k != "decoder_batch"}])
        print()
    return _emit(args, {"bench": "codec", **row}, row["decoder_batch"])
