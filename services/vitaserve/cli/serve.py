"""`vita-audio serve encoder|decoder|gateway`: run one service in the foreground (a pod's command).

Each service's settings object is built here, once, from its flags and (for secrets such as the
Redis URL) the environment, and handed to that service's `serve(settings)`.
"""

from __future__ import annotations

import argparse
import importlib

from vitaserve.common.threads import TORCH_SERVICES

# service -> (settings class as "module:name", help, description)
SERVICES = {
    "encoder": ("vitaserve.encoder.settings:EncoderSettings",
                "GLM-4-Voice speech tokenizer (vita.audio.v1.Encoder)",
                "Speech -> audio token ids; concurrent requests are batched together."),
    "decoder": ("vitaserve.decoder.settings:DecoderSettings",
                "GLM-4-Voice flow + HiFT decoder (vita.audio.v1.Decoder)",
                "Audio token ids -> PCM, streamed block by block; each stream's caches live in Redis so any "
                "replica can decode its next block. Concurrent blocks of equal shapes share one forward. "
                "The Redis URL is read from $VITA_REDIS_URL, or the file named by $VITA_REDIS_URL_FILE."),
    "gateway": ("vitaserve.gateway.settings:GatewaySettings",
                "the public Conversation service",
                "vita.audio.v1.Conversation: phone-like calls (codec, VAD, barge-in), encoder -> Triton "
                "generator -> decoder per turn, sessions in Redis."),
}


def settings_class(service: str):
    module, name = SERVICES[service][0].split(":")
    return getattr(importlib.import_module(module), name)


def _logging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", choices=("json", "console"), default="json",
                   help="structlog output on stderr: JSON lines (default) or coloured console lines")


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run one service (encoder, decoder or gateway)",
                              description="Run one service of the cluster in the foreground, with gRPC health "
                                          "checking, reflection, Prometheus metrics and graceful drain on SIGTERM.")
    sub = p.add_subparsers(dest="service", metavar="SERVICE", required=True)
    for service, (_, help_text, description) in SERVICES.items():
        # no abbreviations: `--redis URL` must stay an unknown flag (secrets never in argv), not `--redis-ca`
        sp = sub.add_parser(service, help=help_text, description=description, allow_abbrev=False)
        settings_class(service).add_arguments(sp)
        _logging(sp)
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    import asyncio
    import os

    from vitaserve.cli.main import CLIError
    from vitaserve.common.logs import configure_logging
    from vitaserve.common.malloc_tuning import tune_malloc
    from vitaserve.common.settings import SettingsError

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP threads on shared CPUs
    tune_malloc()  # before any thread pool exists: resident memory levels off
    configure_logging(args.service, args.log_level, json=args.log_format == "json")
    try:
        settings = settings_class(args.service).from_args(args, os.environ)
    except SettingsError as exc:
        raise CLIError(str(exc)) from None
    if args.service in TORCH_SERVICES:
        from vitaserve.common.onednn_cache import bound_primitive_cache
        from vitaserve.common.threads import set_torch_threads

        try:
            bound_primitive_cache()  # before the first convolution: resident memory levels off
            set_torch_threads(settings.threads)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
    serve = importlib.import_module(f"vitaserve.{args.service}.service").serve
    try:
        asyncio.run(serve(settings))
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    return 0
