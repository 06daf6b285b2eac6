"""Test certificates: a CA per test (devcluster/dev_certs.py makes them with `cryptography`), and the
certificates it signs, good and bad (expired, for another host name, from an unknown CA: another
TestCA)."""

from __future__ import annotations

from vitaserve.devcluster.dev_certs import LOOPBACK, CertFiles, DevCA, DevPki, make_dev_pki


class TestCA(DevCA):
    __test__ = False  # not a pytest class

    def __init__(self, directory, name: str = "vita-test-ca"):
        super().__init__(directory, name)


__all__ = ["LOOPBACK", "CertFiles", "DevPki", "TestCA", "make_dev_pki"]
