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


# ---- TLS (common/tls.py) ----------------------------------------------------------------------------
def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key [--tls-client-ca] or --plaintext: how a gRPC service serves its port.
    One of the two is required (server_tls refuses neither), so no service is plaintext by omission."""
    g = parser.add_argument_group("TLS of this service's gRPC port (give --tls-cert and --tls-key, or --plaintext)")
    g.add_argument("--tls-cert", metavar="FILE",
                   help="PEM certificate (chain) served on the gRPC port; re-read when the file changes, so a "
                        "renewed certificate needs no restart")
    g.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (unencrypted; mount it from a Secret)")
    g.add_argument("--tls-client-ca", metavar="FILE",
                   help="mutual TLS: require every client to present a certificate signed by this CA (PEM)")
    g.add_argument("--plaintext", action="store_true",
                   help="serve without TLS: for local development only (vita-audio up)")
    g.add_argument("--health-port", type=int, default=0,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port, for probes that cannot "
                        "speak TLS (the kubelet's gRPC probes); 0 = off")


def server_tls(args: argparse.Namespace):
    """The ServerTls the flags ask for (files checked now), or None for --plaintext; SettingsError otherwise."""
    from vitaserve.common.tls import ServerTls, TlsError

    given = [flag for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                                      ("--tls-client-ca", args.tls_client_ca)) if value]
    if args.plaintext:
        if given:
            raise SettingsError(f"--plaintext and {', '.join(given)} contradict each other: choose one")
        return None
    if not args.tls_cert or not args.tls_key:
        raise SettingsError("serving needs TLS (--tls-cert FILE --tls-key FILE, and --tls-client-ca FILE to require "
                            "client certificates) or an explicit --plaintext (local development only)"
                            + (f"; got only {', '.join(given)}" if given else ""))
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        tls.configuration()
    except TlsError as exc:
        raise SettingsError(str(exc)) from None
    return tls


def _client_tls(ca: str | None, cert: str | None, key: str | None, prefix: str):
    from vitaserve.common.tls import ClientTls, TlsError

    if not (ca or cert or key):
        return None
    if not ca:
        raise SettingsError(f"--{prefix}-cert/--{prefix}-key need --{prefix}-ca (the CA that signed the server)")
    if (cert is None) != (key is None):
        raise SettingsError(f"--{prefix}-cert and --{prefix}-key go together")
    tls = ClientTls(ca, cert, key)
    try:
        tls.credentials()
    except TlsError as exc:
        raise SettingsError(f"--{prefix}-*: {exc}") from None
    return tls


def add_redis_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--redis-ca [--redis-cert --redis-key]: TLS to Redis (a rediss:// URL)."""
    g = parser.add_argument_group("TLS to Redis (with a rediss:// URL)")
    g.add_argument("--redis-ca", metavar="FILE", help="PEM CA that signed Redis's certificate; only it is trusted")
    g.add_argument("--redis-cert", metavar="FILE", help="client certificate for a Redis with tls-auth-clients yes")
    g.add_argument("--redis-key", metavar="FILE", help="private key of --redis-cert")


def redis_tls(args: argparse.Namespace, url: str):
    """ClientTls for Redis from the flags (None: none given); the URL must then be rediss://."""
    tls = _client_tls(args.redis_ca, args.redis_cert, args.redis_key, "redis")
    if tls is not None and not url.startswith("rediss://"):
        raise SettingsError(f"--redis-ca/--redis-cert/--redis-key need a rediss:// URL in ${REDIS_URL_ENV}")
    return tls


def add_internal_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--internal-ca [--internal-cert --internal-key]: the gateway's TLS to encoder, decoder and Triton."""
    g = parser.add_argument_group("TLS to the encoder, decoder and Triton (absent: plaintext)")
    g.add_argument("--internal-ca", metavar="FILE", help="PEM CA that signed the backends' certificates")
    g.add_argument("--internal-cert", metavar="FILE",
                   help="this gateway's client certificate (mutual TLS), the same for all three backends")
    g.add_argument("--internal-key", metavar="FILE", help="private key of --internal-cert")


def internal_tls(args: argparse.Namespace):
    return _client_tls(args.internal_ca, args.internal_cert, args.internal_key, "internal")
