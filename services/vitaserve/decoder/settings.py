"""The decoder's settings: built once in `vita-audio serve decoder` from flags and, for the Redis URL
(it may hold a password), from $VITA_REDIS_URL or the file named by $VITA_REDIS_URL_FILE; then
passed to serve(), so a pod, the local cluster and the tests start the service the same way."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from vitaserve.common.settings import (add_connection_age_arguments, add_redis_tls_arguments, add_server_arguments,
                                       add_tls_arguments, check_connection_age, redis_tls, redis_url, server_tls)
from vitaserve.common.threads import add_threads_argument
from vitaserve.common.tls import ClientTls, ServerTls


@dataclass(frozen=True)
class DecoderSettings:
    decoder: str                           # glm-4-voice-decoder folder
    redis_url: str = field(repr=False)     # a secret: never logged, never in argv
    port: int = 50053                      # 0: any free port
    metrics_port: int = 0                  # Prometheus /metrics (0: off)
    grace_s: float = 30.0                  # drain on SIGTERM
    host: str = "0.0.0.0"
    device: str = "cpu"
    max_batch: int = 8                     # blocks of concurrent streams per forward (equal shapes only)
    max_wait_ms: float = 2.0               # how long a block waits for company
    ode_steps: int = 10                    # flow ODE steps when a request says 0
    deterministic: bool = False            # zero noise: reproducible output
    threads: int = 0                       # torch CPU threads, set by the process (0: its CPU budget)
    max_connection_age_s: float = 300.0   # GOAWAY after this long: gateways' channels spread over new replicas
    max_connection_age_grace_s: float = 60.0  # calls in flight then finish (a DecodeBlock call's deadline is 30 s)
    tls: ServerTls | None = None          # None: plaintext (the CLI asks for --plaintext explicitly)
    health_port: int = 0                  # plaintext grpc.health.v1 alone, for probes without TLS (0: off)
    redis_tls: ClientTls | None = None    # TLS to a rediss:// Redis (CA, client certificate)

    def __post_init__(self) -> None:
        check_connection_age(self.max_connection_age_s, self.max_connection_age_grace_s)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--decoder", required=True, metavar="DIR", help="glm-4-voice-decoder folder")
        parser.add_argument("--device", default=cls.device)
        parser.add_argument("--max-batch", type=int, default=cls.max_batch,
                            help="blocks of concurrent streams decoded in one forward (equal shapes only: the same "
                                 "block of streams cut by the same chunk plan); others wait for the next forward")
        parser.add_argument("--max-wait-ms", type=float, default=cls.max_wait_ms,
                            help="how long a block waits for company before its forward starts")
        parser.add_argument("--ode-steps", type=int, default=cls.ode_steps, help="flow ODE steps when a request says 0")
        parser.add_argument("--deterministic", action="store_true", help="zero noise: reproducible output")
        add_threads_argument(parser)
        add_server_arguments(parser, cls.port, cls.grace_s)
        add_connection_age_arguments(parser, cls.max_connection_age_s, cls.max_connection_age_grace_s)
        add_tls_arguments(parser)
        add_redis_tls_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "DecoderSettings":
        """SettingsError when the Redis URL is in neither $VITA_REDIS_URL nor $VITA_REDIS_URL_FILE, or when
        neither TLS nor --plaintext is asked for."""
        url = redis_url(environ)
        return cls(decoder=args.decoder, redis_url=url, port=args.port,
                   metrics_port=args.metrics_port, grace_s=args.grace_s, device=args.device,
                   max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, ode_steps=args.ode_steps,
                   deterministic=args.deterministic, threads=args.threads,
                   max_connection_age_s=args.max_connection_age_s,
                   max_connection_age_grace_s=args.max_connection_age_grace_s,
                   tls=server_tls(args), health_port=args.health_port, redis_tls=redis_tls(args, url))
