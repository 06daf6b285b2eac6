"""The encoder's settings: built once from flags in `vita-audio serve encoder` and passed to serve(),
so a pod, the local cluster and the tests start the service from the same object."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from vitaserve.common.settings import (add_connection_age_arguments, add_server_arguments, add_tls_arguments,
                                       check_connection_age, server_tls)
from vitaserve.common.threads import add_threads_argument
from vitaserve.common.tls import ServerTls


@dataclass(frozen=True)
class EncoderSettings:
    tokenizer: str                 # glm-4-voice-tokenizer folder
    port: int = 50052              # 0: any free port
    metrics_port: int = 0          # Prometheus /metrics (0: off)
    grace_s: float = 30.0          # drain on SIGTERM
    host: str = "0.0.0.0"
    device: str = "cpu"
    max_batch: int = 16            # requests per tokenizer forward
    max_wait_ms: float = 5.0       # how long a request waits for company
    threads: int = 0               # torch CPU threads, set by the process (0: its CPU budget)
    max_connection_age_s: float = 300.0   # GOAWAY after this long: gateways' channels spread over new replicas
    max_connection_age_grace_s: float = 60.0  # calls in flight then finish (an Encode call's deadline is 10 s)
    tls: ServerTls | None = None   # None: plaintext (the CLI asks for --plaintext explicitly)
    health_port: int = 0           # plaintext grpc.health.v1 alone, for probes without TLS (0: off)

    def __post_init__(self) -> None:
        check_connection_age(self.max_connection_age_s, self.max_connection_age_grace_s)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tokenizer", required=True, metavar="DIR", help="glm-4-voice-tokenizer folder")
        parser.add_argument("--device", default=cls.device)
        parser.add_argument("--max-batch", type=int, default=cls.max_batch, help="requests per forward")
        parser.add_argument("--max-wait-ms", type=float, default=cls.max_wait_ms,
                            help="how long a request waits for company")
        add_threads_argument(parser)
        add_server_arguments(parser, cls.port, cls.grace_s)
        add_connection_age_arguments(parser, cls.max_connection_age_s, cls.max_connection_age_grace_s)
        add_tls_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "EncoderSettings":
        """The encoder reads no secrets; `environ` is taken for the same call shape as the others.
        SettingsError when neither TLS nor --plaintext is asked for."""
        return cls(tokenizer=args.tokenizer, port=args.port, metrics_port=args.metrics_port, grace_s=args.grace_s,
                   device=args.device, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, threads=args.threads,
                   max_connection_age_s=args.max_connection_age_s,
                   max_connection_age_grace_s=args.max_connection_age_grace_s,
                   tls=server_tls(args), health_port=args.health_port)
