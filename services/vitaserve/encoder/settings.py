"""The encoder's settings: built once from flags in `vita-audio serve encoder` and passed to serve(),
so a pod, the local cluster and the tests start the service from the same object."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from vitaserve.common.settings import add_server_arguments
from vitaserve.common.threads import add_threads_argument


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

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tokenizer", required=True, metavar="DIR", help="glm-4-voice-tokenizer folder")
        parser.add_argument("--device", default=cls.device)
        parser.add_argument("--max-batch", type=int, default=cls.max_batch, help="requests per forward")
        parser.add_argument("--max-wait-ms", type=float, default=cls.max_wait_ms,
                            help="how long a request waits for company")
        add_threads_argument(parser)
        add_server_arguments(parser, cls.port, cls.grace_s)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "EncoderSettings":
        """The encoder reads no secrets; `environ` is taken for the same call shape as the others."""
        return cls(tokenizer=args.tokenizer, port=args.port, metrics_port=args.metrics_port, grace_s=args.grace_s,
                   device=args.device, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, threads=args.threads)
