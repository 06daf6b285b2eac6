"""`vita-audio loadtest`: concurrent phone-like calls, first-audio latency report (JSON + HTML)."""

from __future__ import annotations

TINY_CHECKPOINTS = "checkpoints/tiny"  # --local: made on first use, shared with `vita-audio up`


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "loadtest", help="load test a gateway: first-audio latency and capacity under concurrency",
        description="Open N concurrent Converse calls per level, each like a phone call (real-time 20 ms frames "
                    "of espeak-ng speech, several turns, optional barge-in), measure first-audio and first-text "
                    "latency at the caller, playback starvation and errors, and write report.json, report.html "
                    "(plots) and a terminal summary. --local starts the local cluster (tiny checkpoints) itself.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="gateway address host:port")
    where.add_argument("--local", action="store_true", help="start the local cluster for a self-contained run")
    p.add_argument("--concurrency", default="1,4", help="comma-separated levels (ignored with --ramp-slo-ms)")
    p.add_argument("--ramp-slo-ms", type=float, help="ramp 1, 2, 4, ... until p95 first audio exceeds this")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--modes", default="boost", help="comma-separated inference modes to compare")
    p.add_argument("--turns", type=int, default=2, help="turns per call")
    p.add_argument("--codec", default="mulaw", choices=("mulaw", "alaw", "pcm16"))
    p.add_argument("--rate", type=int, default=8000)
    p.add_argument("--push-to-talk", action="store_true",
                   help="send END_OF_UTTERANCE after each utterance (latency from it) instead of waiting for the VAD")
    p.add_argument("--barge-in-prob", type=float, default=0.0, help="chance the caller talks over an answer")
    p.add_argument("--max-new-tokens", type=int, default=120, help="cap of each answer (0: server default)")
    p.add_argument("--turn-timeout-s", type=float, default=120.0)
    p.add_argument("--level-timeout-s", type=float, default=600.0, help="cut a level's calls after this")
    p.add_argument("--duration-s", type=float, default=3600.0, help="the whole run: later levels are skipped")
    p.add_argument("--out", default="loadtest-report", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    import asyncio
    from dataclasses import asdict, replace
    from pathlib import Path

    from tqdm import tqdm

    from vitaserve.cli.main import CLIError
    from vitaserve.loadtest.report import html_report, summarize, text_table, to_json
    from vitaserve.loadtest.runner import (LoadConfig, LoadConfigError, error_counts, failed_calls, levels,
                                           run_load)
    from vitaserve.loadtest.speech import utterances

    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise CLIError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    try:
        cfg = LoadConfig(target=args.target or "local", modes=tuple(m.strip() for m in args.modes.split(",")),
                         concurrency=concurrency, turns=args.turns, codec=args.codec, rate=args.rate,
                         push_to_talk=args.push_to_talk, barge_in_prob=args.barge_in_prob,
                         max_new_tokens=args.max_new_tokens, turn_timeout_s=args.turn_timeout_s,
                         level_timeout_s=args.level_timeout_s, duration_s=args.duration_s,
                         ramp_slo_ms=args.ramp_slo_ms, max_concurrency=args.max_concurrency, seed=args.seed)
    except LoadConfigError as exc:
        raise CLIError(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    speech = utterances(cfg.rate, out / "speech")
    cluster = None
    target = args.target
    if args.local:
        from vitaserve.devcluster.checkpoints import CheckpointWriteError, ensure_checkpoints
        from vitaserve.devcluster.cluster import LocalCluster
        from vitaserve.devcluster.processes import free_port

        try:
            ckpt = ensure_checkpoints(Path(TINY_CHECKPOINTS), "tiny", progress=lambda msg: print(msg, flush=True))
        except CheckpointWriteError as exc:
            raise CLIError(str(exc)) from None
        port = free_port()
        cluster = LocalCluster(ckpt.lm, ckpt.tokenizer, ckpt.decoder, port=port,
                               num_slots=max(16, max(levels(cfg))), max_len=2048,
                               progress=lambda m: print(f"  {m}", flush=True)).start()
        target = f"127.0.0.1:{port}"
    try:
        cfg = replace(cfg, target=target)
        total = len(cfg.modes) * sum(levels(cfg)) * cfg.turns
        with tqdm(total=total, desc="turns", unit="turn") as bar:
            results = asyncio.run(run_load(cfg, speech, progress=lambda: bar.update(1)))
    finally:
        if cluster is not None:
            cluster.stop()
    turns = [t for level in results for t in level.turns]
    errors = error_counts(results)
    rows = summarize(turns, failed_calls(results), {(lv.mode, lv.concurrency): lv.loop_lag_ms for lv in results})
    config = {**asdict(cfg), "levels_wall_s": {f"{lv.mode}@{lv.concurrency}": round(lv.wall_s, 1) for lv in results}}
    (out / "report.json").write_text(to_json(config, rows, turns, dict(errors)))
    (out / "report.html").write_text(html_report(config, rows, turns, dict(errors)))
    print(text_table(rows))
    print(f"\nwrote {out / 'report.json'} and {out / 'report.html'}")
    return 1 if errors else 0
