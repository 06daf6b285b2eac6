"""TLS for every gRPC hop: a server's certificate (reloaded from disk when it changes) and a client's.

Server: `ServerTls(cert_file, key_file, client_ca_file)`; with a client CA the server requires a
client certificate signed by it (mutual TLS) and refuses any other during the handshake. Its
credentials are dynamic: gRPC asks for the certificate at every new handshake, and we hand it a new
one when a file's contents changed, so a certificate renewed on disk (cert-manager
rewriting a mounted Secret) is served to the next new connection without a restart; connections
already open keep theirs. A half-written or mismatched pair (the certificate renewed, its key not
yet) is not taken: the old one stays until the files agree.

Client: `ClientTls(ca_file, cert_file, key_file, server_name)`: trusts only `ca_file`, presents
the certificate when given (mutual TLS), and checks the server's name against `server_name` instead
of the target's host when given. A client's certificate is read once, when its channel is made.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

log = structlog.get_logger(__name__)


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{what} {path} is not PEM (no -----BEGIN line)")
    return data


def check_pair(cert_pem: bytes, key_pem: bytes, cert_file: str, key_file: str) -> None:
    """TlsError unless the key is the private half of the certificate's first public key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TlsError(f"certificate {cert_file}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise TlsError(f"key {key_file}: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.PEM, spki)
            != key.public_key().public_bytes(serialization.Encoding.PEM, spki)):
        raise TlsError(f"key {key_file} does not belong to certificate {cert_file}")


@dataclass(frozen=True)
class ServerTls:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: mutual TLS, clients need a certificate from this CA

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def files(self) -> list[str]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _signature(self) -> tuple:
        """The files' bytes: what the certificate is. Not their modification times: a file rewritten
        within one tick of the file system's clock keeps its time (seen here: two renewals 10 ms
        apart), and reading three small files costs microseconds beside the handshake they precede."""
        out = []
        for path in self.files():
            try:
                out.append(Path(path).read_bytes())
            except OSError:
                out.append(None)
        return tuple(out)

    def configuration(self):
        """gRPC's certificate configuration from the files as they are now; TlsError if unusable."""
        cert, key = _read(self.cert_file, "certificate"), _read(self.key_file, "key")
        check_pair(cert, key, self.cert_file, self.key_file)
        ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic server credentials that take new files at the next handshake (module docstring)."""
        state = {"signature": self._signature()}
        initial = self.configuration()  # a broken start fails here, loudly

        def fetch():  # called by gRPC at each new handshake: None keeps the current configuration
            signature = self._signature()
            if signature == state["signature"]:
                return None
            try:
                configuration = self.configuration()
            except TlsError as exc:
                log.warning("new TLS files not taken yet, serving the previous certificate", reason=str(exc))
                return None
            state["signature"] = signature
            log.info("TLS certificate reloaded", cert_file=self.cert_file)
            return configuration

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.mutual)

    def _ssl_context(self) -> ssl.SSLContext:
        cert, key = _read(self.cert_file, "certificate"), _read(self.key_file, "key")
        check_pair(cert, key, self.cert_file, self.key_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            context.load_verify_locations(cadata=_read(self.client_ca_file, "client CA").decode())
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate for a non-gRPC listener (the telephony adapters' wss:// and TLS
        ports), renewed the same way: at each handshake the files are compared with the ones in use,
        and a new, complete pair is swapped in for that connection and the next (the handshake's
        servername callback, which OpenSSL calls with or without SNI, sets the connection's context)."""
        state = {"signature": self._signature(), "context": self._ssl_context()}  # a broken start fails here

        def pick(connection: ssl.SSLObject, server_name: str | None, outer: ssl.SSLContext) -> None:
            signature = self._signature()
            if signature != state["signature"]:
                try:
                    state["context"] = self._ssl_context()
                    log.info("TLS certificate reloaded", cert_file=self.cert_file)
                except (TlsError, ssl.SSLError, OSError) as exc:
                    log.warning("new TLS files not taken yet, serving the previous certificate", reason=str(exc))
                state["signature"] = signature  # a broken pair is tried again only once the files change
            connection.context = state["context"]

        outer = self._ssl_context()
        outer.sni_callback = pick
        return outer


@dataclass(frozen=True)
class ClientTls:
    ca_file: str                        # the CA that signed the server's certificate (only it is trusted)
    cert_file: str | None = None        # this client's certificate, for servers that require mutual TLS
    key_file: str | None = None
    server_name: str | None = field(default=None)  # check the server's certificate for this name

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        ca = _read(self.ca_file, "CA")
        cert = key = None
        if self.cert_file:
            cert, key = _read(self.cert_file, "certificate"), _read(self.key_file, "key")
            check_pair(cert, key, self.cert_file, self.key_file)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def secure_or_insecure_channel(target: str, tls: ClientTls | None, options: list) -> grpc.aio.Channel:
    """An asyncio channel: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.channel_options()])
