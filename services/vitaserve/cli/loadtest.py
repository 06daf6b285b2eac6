"""`vita-audio loadtest`: concurrent phone-like calls, first-audio latency report (JSON + HTML); with
--soak-minutes a bounded soak (memory of every process, Redis keys), with --chaos faults under load."""

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
    p.add_argument("--concurrency", help="comma-separated levels (ignored with --ramp-slo-ms; default 1,4, "
                                        "with --compare-tls 1,16)")
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
    p.add_argument("--protocol", default="grpc",
                   help="how calls are placed: grpc (Converse), twilio (Media Streams WebSocket), realtime (OpenAI "
                        "Realtime WebSocket) or audiosocket (Asterisk, TCP). One protocol: --target is its address "
                        "(ws://host:port/path for the WebSocket ones). Several, comma-separated, with --local: one "
                        "gateway serves them all and each level runs on every protocol back to back for --repeats "
                        "rounds; reports each adapter's added first-audio latency against gRPC at the caller and its "
                        "own time from the gateway's timestamps (protocol-compare.json, protocol-compare.html)")
    p.add_argument("--out", default="loadtest-report", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls", type=int, default=4, help="soak and chaos: callers at once (--concurrency is for latency)")
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls-ca", metavar="FILE", help="with --target: the gateway serves TLS; trust this CA (PEM)")
    tls.add_argument("--tls", action="store_true",
                     help="with --local: TLS on every hop (certificates generated in the cluster's work dir; "
                          "encoder, decoder, Triton and Redis mutual TLS), callers over TLS too")
    tls.add_argument("--compare-tls", action="store_true",
                     help="with --local: what TLS adds to first audio. Starts a plaintext and a TLS cluster (every "
                          "hop, as --tls) side by side and runs each level on one then the other for --repeats "
                          "rounds; reports p50/p95 per side and TLS - plain with its per-round range "
                          "(tls-compare.json, tls-compare.html)")
    tls.add_argument("--repeats", type=int, default=3,
                     help="--compare-tls and several --protocol: rounds of every side per level")
    soak = p.add_argument_group("soak (needs --local)")
    soak.add_argument("--soak-minutes", type=float,
                      help="callers place call after call for this long while the RSS of every cluster process is "
                           "sampled; reports its growth from the warm-up's end and Redis keys before/after")
    soak.add_argument("--soak-warmup-s", type=float, default=120.0, help="growth is measured from here to the end")
    soak.add_argument("--sample-s", type=float, default=3.0, help="RSS sampling period")
    chaos = p.add_argument_group("chaos (needs --local)")
    chaos.add_argument("--chaos", action="store_true",
                       help="kill, SIGSTOP or restart a random component while calls run; report turns completed, "
                            "failed by code, calls lost, and every fault")
    chaos.add_argument("--chaos-minutes", type=float, default=5.0, help="how long calls run under chaos")
    chaos.add_argument("--chaos-every-s", type=float, default=20.0,
                       help="quiet seconds between one fault's recovery and the next fault")
    chaos.add_argument("--chaos-components", help="comma-separated targets (default: every service of the cluster)")
    chaos.add_argument("--chaos-faults", help="comma-separated of kill, stop, restart (default: all three)")
    chaos.add_argument("--chaos-stop-s", type=float, default=3.0, help="how long a SIGSTOPped component stays stopped")
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

    if args.tls and not args.local:
        raise CLIError("--tls starts the local cluster on TLS: it needs --local (for a gateway of yours: --tls-ca)")
    if args.tls_ca and args.local:
        raise CLIError("--tls-ca is for --target; with --local use --tls")
    check_compare_tls(args)
    protocols = check_protocols(args)
    args.concurrency = args.concurrency or ("1,16" if args.compare_tls else "1,4")
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
                         ramp_slo_ms=args.ramp_slo_ms, max_concurrency=args.max_concurrency, seed=args.seed,
                         tls_ca=args.tls_ca, protocol=protocols[0])
    except LoadConfigError as exc:
        raise CLIError(str(exc)) from None
    special = settings_of(args, cfg)  # soak or chaos settings, checked before anything starts
    if special is not None and args.tls:
        raise CLIError("--tls is for latency runs; soak and chaos read the cluster's Redis in plaintext")
    if special is not None:
        try:
            cfg = replace(cfg, concurrency=(args.calls,))
        except LoadConfigError as exc:
            raise CLIError(f"--calls: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(protocols) > 1:
        return run_compare_protocols(cfg, protocols, args.repeats, out)
    speech = utterances(cfg.rate, out / "speech")
    if args.compare_tls:
        return run_compare_tls(cfg, speech, args.repeats, out)
    adapters = [p for p in protocols if p != "grpc"]
    cluster = start_local(max(16, max(levels(cfg))), tls=args.tls, adapters=adapters) if args.local else None
    target = args.target or address(cluster, protocols[0])
    if cluster is not None and cluster.pki is not None:
        cfg = replace(cfg, tls_ca=str(cluster.pki.ca))
    if special is not None:
        try:
            return run_special(cluster, replace(cfg, target=target), speech, special, out)
        finally:
            cluster.stop()
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


def check_compare_tls(args) -> None:
    """--compare-tls runs its own two local clusters, one mode, fixed levels: refuse what cannot mix."""
    from vitaserve.cli.main import CLIError

    if not args.compare_tls:
        return
    if not args.local:
        raise CLIError("--compare-tls starts its own plaintext and TLS clusters: it needs --local")
    clash = [flag for flag, on in (("--tls", args.tls), ("--ramp-slo-ms", args.ramp_slo_ms is not None),
                                   ("--soak-minutes", args.soak_minutes is not None), ("--chaos", args.chaos))
             if on]
    if clash:
        raise CLIError(f"--compare-tls runs fixed levels on both sides; drop {', '.join(clash)}")
    if "," in args.modes:
        raise CLIError(f"--compare-tls compares one mode, got --modes {args.modes}")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")


def check_protocols(args) -> list[str]:
    """The --protocol list, gRPC first when several are compared; a clear error for what cannot run."""
    from vitaserve.cli.main import CLIError
    from vitaserve.loadtest.protocols import PROTOCOLS, audio_of

    names = [p.strip() for p in args.protocol.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROTOCOLS]
    if not names or unknown:
        raise CLIError(f"--protocol takes {', '.join(PROTOCOLS)} (comma-separated), got {args.protocol!r}")
    names = list(dict.fromkeys(names))
    if names != ["grpc"]:
        clash = [flag for flag, on in (("--tls", args.tls), ("--tls-ca", args.tls_ca), ("--compare-tls", args.compare_tls),
                                       ("--soak-minutes", args.soak_minutes is not None), ("--chaos", args.chaos))
                 if on]
        if clash:
            raise CLIError(f"--protocol {args.protocol} runs plaintext latency levels; drop {', '.join(clash)}")
    if len(names) > 1:
        if not args.local:
            raise CLIError("several --protocol values are compared on one local gateway serving them all: add --local")
        if args.ramp_slo_ms is not None or "," in args.modes:
            raise CLIError("a protocol comparison runs fixed levels of one mode: drop --ramp-slo-ms / extra --modes")
        if args.repeats < 1:
            raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
        names = ["grpc"] + [p for p in names if p != "grpc"]  # the baseline
    if len(names) == 1 and names[0] != "grpc":
        args.codec, args.rate = audio_of(names[0], args.codec, args.rate)  # the adapter's fixed audio
    return names


def address(cluster, protocol: str) -> str:
    """Where `protocol`'s calls go on the local cluster's gateway."""
    if protocol == "grpc":
        return f"127.0.0.1:{cluster.port}"
    port = cluster.adapter_port(protocol)
    return f"127.0.0.1:{port}" if protocol == "audiosocket" else f"ws://127.0.0.1:{port}/{protocol}"


def run_compare_protocols(cfg, protocols: list[str], repeats: int, out) -> int:
    """One local gateway serving every adapter; each level on every protocol back to back, `repeats`
    rounds; the caller-side difference against gRPC and each adapter's own time from the gateway's
    metrics; exit 1 when a call or turn failed on any side."""
    import asyncio
    import os
    from dataclasses import asdict, replace

    from tqdm import tqdm

    from vitaserve.loadtest import adapter_time
    from vitaserve.loadtest.compare import comparison_html, comparison_text, differences, errors, run_comparison, to_json
    from vitaserve.loadtest.protocols import audio_of
    from vitaserve.loadtest.runner import levels
    from vitaserve.loadtest.speech import utterances

    configs, speech = {}, {}
    for protocol in protocols:
        codec, rate = audio_of(protocol, cfg.codec, cfg.rate)
        configs[protocol] = replace(cfg, protocol=protocol, codec=codec, rate=rate)
        speech[protocol] = utterances(rate, out / "speech")
    load_before = os.getloadavg()
    # AudioSocket carries no answer cap: the gateway's default cap is the load test's, so every
    # protocol's answers are equally long
    cluster = start_local(max(16, max(levels(cfg))), adapters=[p for p in protocols if p != "grpc"],
                          max_new_tokens=cfg.max_new_tokens)
    try:
        configs = {p: replace(c, target=address(cluster, p)) for p, c in configs.items()}
        total = len(protocols) * repeats * sum(cfg.concurrency) * cfg.turns
        with tqdm(total=total, desc="turns", unit="turn") as bar:
            runs = asyncio.run(run_comparison(configs, speech, repeats, cfg.modes[0], on_turn=lambda: bar.update(1)))
        server = adapter_time.scrape(cluster.service("gateway").metrics)
    finally:
        cluster.stop()
    config = {**asdict(cfg), "target": "local", "mode": cfg.modes[0], "repeats": repeats, "protocols": protocols,
              "targets": {p: c.target for p, c in configs.items()},
              "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(), "cpus": os.cpu_count()}
    server_rows = [{"protocol": p, "direction": d, **f} for (p, d), f in sorted(server.items())]
    (out / "protocol-compare.json").write_text(to_json(config, runs, extra={"adapter_server_ms": server_rows}))
    about = ("One local gateway serving gRPC and the telephony adapters; each adapter's caller speaks its protocol "
             "(Twilio: mu-law 8 kHz, marks echoed as a phone plays them; Realtime: PCM16 24 kHz; AudioSocket: "
             "signed linear 8 kHz; gRPC: " + f"{cfg.codec} {cfg.rate} Hz).")
    extra = ("<h2>Each adapter's own time, from the gateway's timestamps</h2><pre>"
             + _escape(adapter_time.table(server)) + "</pre>")
    (out / "protocol-compare.html").write_text(comparison_html(
        config, runs, "First-audio latency: each telephony adapter vs gRPC (same run, same gateway)", about, extra))
    print(comparison_text(differences(runs)))
    print("\neach adapter's own time per message (gateway metrics):\n" + adapter_time.table(server))
    print(f"\nwrote {out / 'protocol-compare.json'} and {out / 'protocol-compare.html'}")
    return 1 if any(errors(runs).values()) else 0


def _escape(text: str) -> str:
    from html import escape

    return escape(text)


def run_compare_tls(cfg, speech, repeats: int, out) -> int:
    """Both clusters up (one after the other: start-up is heavy), the alternating levels, the report;
    exit 1 when a call or turn failed on either side."""
    import asyncio
    import os
    from dataclasses import asdict, replace

    from tqdm import tqdm

    from vitaserve.loadtest.runner import levels
    from vitaserve.loadtest.compare import (comparison_html, comparison_text, differences, errors,
                                            run_comparison, to_json)

    clusters = {}
    load_before = os.getloadavg()  # the machine's load: a busy machine's figures say so
    try:
        for side, tls in (("plain", False), ("tls", True)):
            print(f"starting the {side} cluster", flush=True)
            clusters[side] = start_local(max(16, max(levels(cfg))), tls=tls)
        configs = {side: replace(cfg, target=f"127.0.0.1:{c.port}", tls_ca=str(c.pki.ca) if c.pki else None)
                   for side, c in clusters.items()}
        total = 2 * repeats * sum(cfg.concurrency) * cfg.turns
        with tqdm(total=total, desc="turns", unit="turn") as bar:
            runs = asyncio.run(run_comparison(configs, {side: speech for side in configs}, repeats, cfg.modes[0],
                                              on_turn=lambda: bar.update(1)))
    finally:
        for c in clusters.values():
            c.stop()
    config = {**asdict(cfg), "target": "local", "mode": cfg.modes[0], "repeats": repeats,
              "targets": {side: c.target for side, c in configs.items()},
              "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(), "cpus": os.cpu_count()}
    (out / "tls-compare.json").write_text(to_json(config, runs))
    (out / "tls-compare.html").write_text(comparison_html(
        config, runs, "First-audio latency: TLS on every hop vs plaintext (same run)",
        f"Two local clusters side by side, plaintext and TLS on every hop; codec {cfg.codec} {cfg.rate} Hz."))
    print(comparison_text(differences(runs)))
    print(f"\nwrote {out / 'tls-compare.json'} and {out / 'tls-compare.html'}")
    return 1 if any(errors(runs).values()) else 0


def settings_of(args, cfg):
    """SoakSettings, ChaosSettings or None (a latency run); a clear error for what cannot run."""
    from vitaserve.cli.main import CLIError
    from vitaserve.loadtest.chaos import ChaosSettings
    from vitaserve.loadtest.runner import LoadConfigError
    from vitaserve.loadtest.soak import SoakSettings

    if args.soak_minutes is None and not args.chaos:
        return None
    what = "--chaos" if args.chaos else "--soak-minutes"
    if args.chaos and args.soak_minutes is not None:
        raise CLIError("--chaos and --soak-minutes are separate runs (restarts would mix into the memory figures)")
    if not args.local:
        raise CLIError(f"{what} needs --local: it reads the cluster's processes and Redis")
    if cfg.ramp_slo_ms is not None or len(cfg.modes) != 1:
        raise CLIError(f"{what} runs one mode and no ramp")
    try:
        if args.chaos:
            names = {k: tuple(n.strip() for n in v.split(",") if n.strip())
                     for k, v in (("components", args.chaos_components), ("faults", args.chaos_faults)) if v}
            return ChaosSettings(minutes=args.chaos_minutes, every_s=args.chaos_every_s, seed=args.seed,
                                 stop_s=args.chaos_stop_s, **names)
        return SoakSettings(minutes=args.soak_minutes, warmup_s=args.soak_warmup_s, sample_s=args.sample_s)
    except LoadConfigError as exc:
        raise CLIError(str(exc)) from None


def start_local(slots: int, tls: bool = False, adapters=(), max_new_tokens: int = 0):
    """The local cluster on tiny checkpoints (made on first use), started and ready; `tls`: on every hop;
    `adapters`: the telephony adapters its gateway serves (loadtest/protocols.py); `max_new_tokens`: the
    gateway's cap of an answer that asks for none (0: its default)."""
    from pathlib import Path

    from vitaserve.cli.main import CLIError
    from vitaserve.devcluster.checkpoints import CheckpointWriteError, ensure_checkpoints
    from vitaserve.devcluster.cluster import LocalCluster
    from vitaserve.devcluster.processes import free_port

    try:
        ckpt = ensure_checkpoints(Path(TINY_CHECKPOINTS), "tiny", progress=lambda msg: print(msg, flush=True))
    except CheckpointWriteError as exc:
        raise CLIError(str(exc)) from None
    return LocalCluster(ckpt.lm, ckpt.tokenizer, ckpt.decoder, port=free_port(), num_slots=slots, max_len=2048,
                        progress=lambda m: print(f"  {m}", flush=True), tls=tls, adapters=adapters,
                        max_new_tokens=max_new_tokens).start()


def run_special(cluster, cfg, speech, settings, out) -> int:
    """A soak or a chaos run: writes <kind>.json (with the figures' data) and <kind>.html; exit 1 when
    its verdict fails (memory over the bound or Redis keys left unbounded; a call lost)."""
    import json

    from tqdm import tqdm

    from vitaserve.loadtest.chaos import ChaosSettings, chaos_html, chaos_text, run_chaos
    from vitaserve.loadtest.soak import run_soak, soak_html, soak_text

    calls = cfg.concurrency[0]
    with tqdm(desc="turns", unit="turn") as bar:
        if isinstance(settings, ChaosSettings):
            kind = "chaos"
            report = run_chaos(cluster, cfg, speech, settings, calls, on_turn=lambda: bar.update(1),
                               progress=lambda m: bar.write(f"  {m}"))
            text, html = chaos_text(report), chaos_html(report)
            failed = report["calls"]["lost"] > 0
        else:
            kind = "soak"
            report = run_soak(cluster, cfg, speech, settings, calls, on_turn=lambda: bar.update(1))
            text, html = soak_text(report), soak_html(report)
            keys = report["redis_keys"]
            failed = not report["rss_ok"] or not (keys["back_to_baseline"] or keys["left_bounded"])
    (out / f"{kind}.json").write_text(json.dumps(report, indent=1))
    (out / f"{kind}.html").write_text(html)
    print(text)
    print(f"\nwrote {out / (kind + '.json')} and {out / (kind + '.html')}")
    return 1 if failed else 0
