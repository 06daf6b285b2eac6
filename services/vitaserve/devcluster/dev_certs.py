"""Certificates for a local cluster and the tests, made with `cryptography`: a CA, and certificates it
signs for loopback host names (usable by a server and a client), including bad ones the TLS tests
need (expired, for another host name). Never for production: a real deployment's certificates come
from its own CA (cert-manager, charts/vita-audio).

EC P-256 keys: generating one takes microseconds (an RSA key ~50 ms), and gRPC, redis-server
(OpenSSL) and tritonserver all accept them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1")



@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key, as PEM files."""
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts) -> x509.SubjectAlternativeName:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


class DevCA:
    """A certificate authority in `directory`: `file` is its certificate (what a peer trusts)."""

    def __init__(self, directory: Path, name: str = "vita-dev-ca"):
        self.directory, self.name = Path(directory), name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.file = self.directory / f"{name}.pem"
        self.file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, hosts=LOOPBACK, *, expired: bool = False, file_stem: str | None = None) -> CertFiles:
        """A leaf certificate for `hosts` (subject alternative names), usable by a server and a
        client; `expired`: valid only until yesterday. Written to `file_stem` (default `name`; relative
        to this CA's directory) + .crt and .key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        start, end = ((now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired
                      else (now - dt.timedelta(hours=1), now + dt.timedelta(days=7)))
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(_san(hosts), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        stem = self.directory / (file_stem or name)
        files = CertFiles(stem.with_name(stem.name + ".crt"), stem.with_name(stem.name + ".key"))
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(_pem_key(key))
        files.key.chmod(0o600)
        return files


@dataclass(frozen=True)
class DevPki:
    """What a local cluster on TLS needs: one CA, a server certificate every local service serves
    (127.0.0.1 and localhost), and a client certificate for the callers of mutual-TLS hops."""
    ca: Path
    server: CertFiles
    client: CertFiles


def make_dev_pki(directory: Path) -> DevPki:
    ca = DevCA(directory)
    return DevPki(ca.file, ca.issue("vita-dev-server"), ca.issue("vita-dev-client"))
