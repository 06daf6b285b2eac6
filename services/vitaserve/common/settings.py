"""Where a service's settings come from: flags for plain values, the environment or a file for secrets.

A secret (a Redis URL with its password, API keys, key files' passphrases) never travels in argv,
where `ps` and Kubernetes events show it: a service reads it from $NAME, or from the file named by
$NAME_FILE (a mounted Kubernetes Secret). Each service turns both into one frozen settings object in
`vita-audio serve`, once, and passes it down; nothing deeper reads the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

REDIS_URL_ENV = "VITA_REDIS_URL"  # redis://[:password@]host:port/db, rediss://..., redis+sentinel://...


class SettingsError(ValueError):
    """A setting that is missing or malformed; the message says which and where it is read from."""


def secret(name: str, environ: Mapping[str, str] | None = None, required: bool = True) -> str | None:
    """$name, or the contents of the file named by $name_FILE (trailing newline dropped)."""
    environ = os.environ if environ is None else environ
    value, path = environ.get(name), environ.get(f"{name}_FILE")
    if value and path:
        raise SettingsError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            value = Path(path).read_text().rstrip("\r\n")
        except OSError as exc:
            raise SettingsError(f"{name}_FILE={path}: {exc.strerror}") from None
    if not value and required:
        raise SettingsError(f"{name} is not set: give it in the environment, or a file holding it in {name}_FILE")
    return value or None


def redis_url(environ: Mapping[str, str] | None = None) -> str:
    return secret(REDIS_URL_ENV, environ)


def add_server_arguments(parser: argparse.ArgumentParser, port: int, grace_s: float = 30.0) -> None:
    """--port, --metrics-port and --grace-s: what every gRPC service is started with."""
    parser.add_argument("--port", type=int, default=port, help=f"gRPC port (default {port}; 0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    parser.add_argument("--grace-s", type=float, default=grace_s,
                        help="on SIGTERM: health turns NOT_SERVING, running calls get this long to finish")


def add_connection_age_arguments(parser: argparse.ArgumentParser, age_s: float, grace_s: float) -> None:
    """--max-connection-age-s and --max-connection-age-grace-s (common/grpc_server.make_server)."""
    parser.add_argument("--max-connection-age-s", type=float, default=age_s,
                        help="send clients GOAWAY on connections this old, so that long-lived channels reconnect "
                             f"and spread over new replicas (0 = never; default {age_s:g})")
    parser.add_argument("--max-connection-age-grace-s", type=float, default=grace_s,
                        help="calls in flight on an aged connection may go on this long before it is closed; "
                             f"keep it above the longest call's deadline (default {grace_s:g})")


def check_connection_age(age_s: float, grace_s: float) -> None:
    """SettingsError unless both are finite and >= 0."""
    for flag, value in (("--max-connection-age-s", age_s), ("--max-connection-age-grace-s", grace_s)):
        if not 0 <= value < float("inf"):
            raise SettingsError(f"{flag} must be a number of seconds >= 0, got {value}")
