"""`vita-audio serve encoder|decoder|gateway`: run one service in the foreground (a pod's command)."""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--port", type=int, default=port, help=f"gRPC port (default {port}; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM: health turns NOT_SERVING, running calls get this long to finish")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", choices=("json", "console"), default="json",
                   help="structlog output on stderr: JSON lines (default) or coloured console lines")


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = the CPUs this container may use: its cgroup quota, else its "
                        "cores); set it to the pod's CPU request when there is no CPU limit")


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run one service (encoder, decoder or gateway)",
                              description="Run one service of the cluster in the foreground, with gRPC health "
                                          "checking, reflection, Prometheus metrics and graceful drain on SIGTERM.")
    sub = p.add_subparsers(dest="service", metavar="SERVICE", required=True)

    enc = sub.add_parser("encoder", help="GLM-4-Voice speech tokenizer (vita.audio.v1.Encoder)",
                         description="Speech -> audio token ids; concurrent requests are batched together.")
    enc.add_argument("--tokenizer", required=True, metavar="DIR", help="glm-4-voice-tokenizer folder")
    enc.add_argument("--device", default="cpu")
    enc.add_argument("--max-batch", type=int, default=16, help="requests per forward")
    enc.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for company")
    _threads(enc)
    _common(enc, 50052)

    dec = sub.add_parser("decoder", help="GLM-4-Voice flow + HiFT decoder (vita.audio.v1.Decoder)",
                         description="Audio token ids -> PCM, streamed block by block; each stream's caches "
                                     "live in Redis so any replica can decode its next block. Concurrent "
                                     "blocks of equal shapes share one forward.")
    dec.add_argument("--decoder", required=True, metavar="DIR", help="glm-4-voice-decoder folder")
    dec.add_argument("--redis", required=True, metavar="URL", help="Redis URL holding the stream states")
    dec.add_argument("--device", default="cpu")
    dec.add_argument("--max-batch", type=int, default=8,
                     help="blocks of concurrent streams decoded in one forward (equal shapes only: the same "
                          "block of streams cut by the same chunk plan); others wait for the next forward")
    dec.add_argument("--max-wait-ms", type=float, default=2.0,
                     help="how long a block waits for company before its forward starts")
    dec.add_argument("--ode-steps", type=int, default=10, help="flow ODE steps when a request says 0")
    dec.add_argument("--deterministic", action="store_true", help="zero noise: reproducible output")
    _threads(dec)
    _common(dec, 50053)

    gw = sub.add_parser("gateway", help="the public Conversation service",
                        description="vita.audio.v1.Conversation: phone-like calls (codec, VAD, barge-in), "
                                    "encoder -> Triton generator -> decoder per turn, sessions in Redis.")
    gw.add_argument("--lm", required=True, metavar="DIR", help="VITA-Audio folder (its tokenizer and config are read)")
    gw.add_argument("--encoder", required=True, help="encoder address (host:port, dns:///name:port, ipv4:a,b)")
    gw.add_argument("--decoder", required=True, help="decoder address (several replicas: dns:/// or ipv4:a,b)")
    gw.add_argument("--triton", required=True, help="Triton gRPC address (host:port)")
    gw.add_argument("--redis", required=True, metavar="URL", help="Redis URL for sessions")
    gw.add_argument("--mode", default="boost", help="default inference mode of calls that name none")
    gw.add_argument("--context-tokens", type=int, default=4096,
                    help="the generator's context in tokens (Triton's max_len): prompts keep the newest turns "
                         "that fit beside the answer's max_new_tokens")
    _common(gw, 50051)
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    import asyncio
    import os

    from vitaserve.cli.main import CLIError
    from vitaserve.common.logs import configure_logging

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP threads on shared CPUs
    configure_logging(args.service, args.log_level, json=args.log_format == "json")
    if args.service in ("encoder", "decoder"):
        from vitaserve.common.threads import set_torch_threads

        try:
            set_torch_threads(args.threads)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
    if args.service == "encoder":
        from vitaserve.encoder.service import serve

        coro = serve(args.tokenizer, args.port, args.metrics_port, args.device, args.max_batch, args.max_wait_ms,
                     args.grace_s)
    elif args.service == "decoder":
        from vitaserve.decoder.service import serve

        coro = serve(args.decoder, args.port, args.redis, args.metrics_port, args.device, args.max_batch,
                     args.max_wait_ms, args.ode_steps, args.deterministic, args.grace_s)
    else:
        from vitaserve.gateway.service import serve

        import socket

        from vitaserve.gateway.config import GatewayConfig

        config = GatewayConfig(default_mode=args.mode, replica_id=socket.gethostname(),
                               context_tokens=args.context_tokens)
        coro = serve(args.lm, args.port, args.encoder, args.decoder, args.triton, args.redis, args.metrics_port,
                     args.mode, args.grace_s, config=config)
    try:
        asyncio.run(coro)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    return 0
