"""`vita-audio up`: the whole cluster on this machine (the embedded default), optionally one call."""

from __future__ import annotations


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "up", help="start the local cluster (Redis, Triton, encoder, decoder, gateway)",
        description="Start Redis, Triton (the tritonserver binary of nvidia-pytriton, on CPU), the encoder, "
                    "decoder and gateway on localhost, wait until each is ready, and print where they listen. "
                    "Without checkpoint folders it uses tiny random-weight checkpoints (generated once into "
                    "--checkpoints; the answers are noise, the pipeline and timings are real). With --call it "
                    "makes one call, writes the answer and stops; otherwise it runs until Ctrl-C or SIGTERM, "
                    "then stops everything.")
    p.add_argument("--lm", metavar="DIR", help="VITA-Audio checkpoint folder (give all three folders, or none)")
    p.add_argument("--tokenizer", metavar="DIR", help="glm-4-voice-tokenizer folder")
    p.add_argument("--decoder", metavar="DIR", help="glm-4-voice-decoder folder")
    p.add_argument("--checkpoints", metavar="DIR", default="checkpoints/tiny",
                   help="where the tiny checkpoints are made on first use (default checkpoints/tiny)")
    p.add_argument("--port", type=int, default=50051, help="gateway port (default 50051)")
    p.add_argument("--mode", default="boost", help="inference mode: vanilla, balance, boost, turbo (default boost)")
    p.add_argument("--num-slots", type=int, default=16, help="calls the generator batches at once")
    p.add_argument("--max-len", type=int, default=4096, help="tokens per call in the generator's KV cache")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads of each model process (Triton's engine, encoder, decoder); 0 = this "
                        "machine's CPUs split between the three")
    p.add_argument("--logs", metavar="DIR", help="folder for the services' logs (default: a new temp folder)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="how long each service may take to be ready")
    call = p.add_argument_group("one call (like `vita-audio call`)")
    call.add_argument("--call", dest="input", metavar="WAV", help="make one call with this question, then stop")
    call.add_argument("--out", default="answer.wav", help="answer WAV for --call (default answer.wav)")
    call.add_argument("--codec", default="mulaw", help="wire codec: mulaw, alaw or pcm16 (default mulaw)")
    call.add_argument("--rate", type=int, default=8000, help="wire sample rate (default 8000)")
    call.add_argument("--push-to-talk", action="store_true", help="send END_OF_UTTERANCE instead of relying on VAD")
    call.add_argument("--max-new-tokens", type=int, default=0, help="cap of the answer's tokens (0: server default)")
    p.set_defaults(func=cmd)


def checkpoint_folders(args):
    """The three folders given, or the tiny ones (made once into --checkpoints)."""
    from pathlib import Path

    from vitaserve.cli.main import CLIError
    from vitaserve.devcluster.checkpoints import CheckpointSet, CheckpointWriteError, ensure_checkpoints

    given = [args.lm, args.tokenizer, args.decoder]
    if any(given) and not all(given):
        raise CLIError("give all three of --lm, --tokenizer, --decoder, or none (tiny checkpoints)")
    if all(given):
        folders = [Path(p) for p in given]
        missing = [str(p) for p in folders if not p.is_dir()]
        if missing:
            raise CLIError(f"not a folder: {', '.join(missing)}")
        return CheckpointSet(*folders)
    try:
        return ensure_checkpoints(Path(args.checkpoints), "tiny", progress=lambda msg: print(msg, flush=True))
    except CheckpointWriteError as exc:
        raise CLIError(str(exc)) from None


def readiness_table(services) -> str:
    rows = [("service", "address", "metrics", "log")]
    rows += [(s.name, s.address, s.metrics or "-", str(s.log)) for s in services]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


def cmd(args) -> int:
    import signal
    import threading
    from pathlib import Path

    from vitaserve.cli.main import CLIError
    from vitaserve.client.file_call import FileCall, FileCallError, place, prepare
    from vitaserve.devcluster.cluster import LocalCluster
    from vitaserve.devcluster.processes import ClusterError

    # Ctrl-C, SIGTERM and a closed terminal all stop the cluster; the services sit in their own
    # process groups, so only this process sees them. One signal is enough: later ones are ignored
    # so that the stop itself is never cut short (it is bounded by its own timeouts).
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    cluster = None
    serving = False
    try:
        prepared = None
        if args.input:  # check the call's inputs before a minute of start-up, not after
            prepared = prepare(FileCall.from_args(args))
        ckpt = checkpoint_folders(args)
        cluster = LocalCluster(ckpt.lm, ckpt.tokenizer, ckpt.decoder, port=args.port, mode=args.mode,
                               num_slots=args.num_slots, max_len=args.max_len, threads=args.threads,
                               workdir=Path(args.logs) if args.logs else None,
                               progress=lambda msg: print(f"  {msg}", flush=True))
        print(f"starting the local cluster (logs in {cluster.workdir})", flush=True)
        cluster.start(args.timeout_s)
        print(f"\n{readiness_table(cluster.services)}\n", flush=True)
        target = f"127.0.0.1:{args.port}"
        print(f"gateway ready: vita-audio call --target {target} --in question.wav --out answer.wav\n", flush=True)
        if prepared is not None:
            print("\n".join(place(target, prepared)), flush=True)
            return 0
        serving = True
        print("running; Ctrl-C stops everything", flush=True)
        while not stopping.wait(1.0):
            dead = cluster.dead()
            if dead:
                tails = "\n".join(f"--- last lines of {s.log} ---\n{s.log_tail(15)}" for s in dead)
                raise CLIError(f"{', '.join(s.name for s in dead)} exited unexpectedly\n{tails}")
        return 0
    except (ClusterError, FileCallError) as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        print("\nstop requested", flush=True)
        return 0 if serving else 130
    finally:
        stopping.set()  # from here on, signals change nothing
        if cluster is not None:
            print("stopping ...", flush=True)
            cluster.stop()
            print("stopped", flush=True)
