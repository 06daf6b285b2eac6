"""`vita-audio faults`: the fault matrix on a local cluster, printed as a table."""

from __future__ import annotations


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "faults", help="run the fault matrix (kill / hang / restart each component) and print it",
        description="Start the local cluster (as `vita-audio up` does) and, for each cell of the matrix "
                    "(encoder, decoder, Triton, gateway, Redis x killed / hung (SIGSTOP) / restarted (SIGTERM) "
                    "x at the start of a turn / mid-answer), make a push-to-talk call, inject the fault, "
                    "measure the time until the caller has a status, bring the component back, check that "
                    "the call's next turn completes and that the Redis history is consistent. Prints one "
                    "row per cell; exit code 1 if any cell failed. The full matrix takes 20-40 minutes on "
                    "a small machine (hung cells wait out each hop's deadline).")
    p.add_argument("--cells", nargs="*", metavar="C/F/M",
                   help="only these cells, e.g. decoder/killed/mid_answer (default: all 30; a part may be *, "
                        "e.g. gateway/*/*)")
    p.add_argument("--lm", metavar="DIR", help="VITA-Audio checkpoint folder (give all three folders, or none)")
    p.add_argument("--tokenizer", metavar="DIR", help="glm-4-voice-tokenizer folder")
    p.add_argument("--decoder", metavar="DIR", help="glm-4-voice-decoder folder")
    p.add_argument("--checkpoints", metavar="DIR", default="checkpoints/tiny",
                   help="where the tiny checkpoints are made on first use (default checkpoints/tiny)")
    p.add_argument("--max-new-tokens", type=int, default=150,
                   help="answer length: long enough that a mid-answer fault lands mid-answer (default 150)")
    p.add_argument("--logs", metavar="DIR", help="folder for the services' logs (default: a new temp folder)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="how long each service may take to be ready")
    p.set_defaults(func=cmd)


def select(patterns: list[str] | None):
    """The cells matching `patterns` (component/fault/moment, each part a name or *), in matrix order."""
    from vitaserve.cli.main import CLIError
    from vitaserve.devcluster.faults import COMPONENTS, FAULTS, MOMENTS, all_cells

    cells = all_cells()
    if not patterns:
        return cells
    chosen = []
    for pattern in patterns:
        parts = pattern.split("/")
        if len(parts) != 3:
            raise CLIError(f"cell {pattern!r}: write component/fault/moment, e.g. decoder/killed/mid_answer")
        for part, known in zip(parts, (COMPONENTS, FAULTS, MOMENTS)):
            if part != "*" and part not in known:
                raise CLIError(f"cell {pattern!r}: {part!r} is not one of {', '.join(known)} or *")
        chosen += [c for c in cells if all(p in ("*", v) for p, v in zip(parts, (c.component, c.fault, c.moment)))
                   and c not in chosen]
    return [c for c in cells if c in chosen]


def cmd(args) -> int:
    from pathlib import Path

    from vitaserve.cli.main import CLIError
    from vitaserve.cli.up import checkpoint_folders
    from vitaserve.devcluster.cluster import LocalCluster
    from vitaserve.devcluster.faults import FaultRunner, table
    from vitaserve.devcluster.processes import ClusterError, free_port

    cells = select(args.cells)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    ckpt = checkpoint_folders(args)
    cluster = LocalCluster(ckpt.lm, ckpt.tokenizer, ckpt.decoder, port=free_port(), max_len=2048,
                           workdir=Path(args.logs) if args.logs else None,
                           progress=lambda msg: print(f"  {msg}", flush=True))
    results = []
    runner = None
    try:
        print(f"starting the local cluster (logs in {cluster.workdir})", flush=True)
        cluster.start(args.timeout_s)
        runner = FaultRunner(cluster, max_new_tokens=args.max_new_tokens, log=lambda msg: print(msg, flush=True))
        for cell in cells:
            results.append(runner.run_cell(cell))
    except ClusterError as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    finally:
        if runner is not None:
            runner.close()
        cluster.stop()
        if results:
            print(f"\n{table(results)}\n", flush=True)
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} cells passed", flush=True)
    return 1 if failed or len(results) < len(cells) else 0
