"""`vita-audio up`: the whole cluster on this machine (the embedded default), optionally one call."""

from __future__ import annotations


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "up", help="start the local cluster (Redis, Triton, encoder, decoder, gateway)",
        description="Start Redis, Triton (the tritonserver binary of nvidia-pytriton, on CPU), the encoder, "
                    "decoder and gateway on localhost, wait until each is ready, and print where they listen. "
                    "Without checkpoint folders it uses tiny random-weight checkpoints (generated once into "
                    "--checkpoints). With --call it makes one call, writes the answer and stops; otherwise it "
                    "runs until Ctrl-C, then stops everything.")
    p.add_argument("--lm", help="VITA-Audio checkpoint folder")
    p.add_argument("--tokenizer", help="glm-4-voice-tokenizer folder")
    p.add_argument("--decoder", help="glm-4-voice-decoder folder")
    p.add_argument("--checkpoints", default="checkpoints/tiny", help="where tiny checkpoints are made when needed")
    p.add_argument("--port", type=int, default=50051, help="gateway port")
    p.add_argument("--mode", default="boost", help="default inference mode")
    p.add_argument("--num-slots", type=int, default=16, help="calls the generator batches at once")
    p.add_argument("--max-len", type=int, default=4096, help="tokens per call in the KV cache")
    p.add_argument("--call", dest="input", metavar="WAV", help="make one call with this question, then stop")
    p.add_argument("--out", default="answer.wav", help="answer WAV for --call")
    p.add_argument("--codec", default="mulaw", choices=("mulaw", "alaw", "pcm16"))
    p.add_argument("--rate", type=int, default=8000)
    p.add_argument("--push-to-talk", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.set_defaults(func=cmd)


def resolve_checkpoints(args):
    from pathlib import Path

    from vitaserve.cli.main import CLIError

    given = [args.lm, args.tokenizer, args.decoder]
    if any(given) and not all(given):
        raise CLIError("give all three of --lm, --tokenizer, --decoder, or none (tiny checkpoints)")
    if all(given):
        folders = [Path(p) for p in given]
        missing = [str(p) for p in folders if not p.is_dir()]
        if missing:
            raise CLIError(f"not a folder: {', '.join(missing)}")
        return folders
    root = Path(args.checkpoints)
    parts = {"lm": "write_lm_checkpoint", "tokenizer": "write_tokenizer_checkpoint", "decoder": "write_decoder_checkpoint"}
    for part in parts:
        if not (root / part).exists():
            print(f"making tiny {part} checkpoint in {root / part} ...", flush=True)
            if part == "lm":
                from vitaserve.generator.checkpoint import write_lm_checkpoint as write
            elif part == "tokenizer":
                from vitaserve.encoder.checkpoint import write_tokenizer_checkpoint as write
            else:
                from vitaserve.decoder.checkpoint import write_decoder_checkpoint as write
            write(root / part, "tiny")
    return [root / "lm", root / "tokenizer", root / "decoder"]


def cmd(args) -> int:
    import signal
    import threading

    from vitaserve.cli.main import CLIError
    from vitaserve.common.local_cluster import ClusterError, LocalCluster

    lm, tokenizer, decoder = resolve_checkpoints(args)
    cluster = LocalCluster(lm, tokenizer, decoder, port=args.port, mode=args.mode, num_slots=args.num_slots,
                           max_len=args.max_len, progress=lambda msg: print(f"  {msg}", flush=True))
    print(f"starting the local cluster (logs in {cluster.workdir})", flush=True)
    try:
        cluster.start()
    except ClusterError as exc:
        raise CLIError(str(exc)) from None
    try:
        print(f"\n{'service':<10} {'address':<22} {'metrics':<36} log")
        for s in cluster.services:
            print(f"{s.name:<10} {s.address:<22} {s.metrics or '-':<36} {s.log}")
        print(f"\ngateway ready: vita-audio call --target 127.0.0.1:{args.port} --in question.wav --out answer.wav\n",
              flush=True)
        if args.input:
            from vitaserve.cli.call import place_call

            return place_call(args, f"127.0.0.1:{args.port}")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("running; Ctrl-C stops everything", flush=True)
        while not stop.wait(1.0):
            dead = [s.name for s in cluster.services if s.proc.poll() is not None]
            if dead:
                raise CLIError(f"{', '.join(dead)} exited; see the logs in {cluster.workdir}")
        return 0
    finally:
        print("stopping ...", flush=True)
        cluster.stop()
        print("stopped", flush=True)
