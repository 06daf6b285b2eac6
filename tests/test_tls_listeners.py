"""ServerTls.ssl_context: the telephony adapters' wss:// and TLS ports serve the gateway's certificate
and take a renewed one at the next handshake, as the gRPC port does (common/tls.py); a half-written
pair is not taken; with a client CA, a client without a certificate is refused."""

from __future__ import annotations

import asyncio
import ssl

from tls_certs import TestCA
from vitaserve.common.tls import ServerTls


async def handshake(port: int, ca: TestCA, client=None) -> int | str:
    """The serial number of the certificate the server presented, or the error's class name."""
    context = ssl.create_default_context(cafile=str(ca.file))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    try:
        data = await asyncio.wait_for(reader.read(1), 5)  # a refused client certificate shows up here (TLS 1.3)
        if not data:
            return "closed"
        return int(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16)  # hex, maybe 0-padded
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


def serve(context: ssl.SSLContext):
    async def hello(reader, writer):
        writer.write(b"!")
        await writer.drain()
        writer.close()
    return asyncio.start_server(hello, "127.0.0.1", 0, ssl=context)


def serial(files) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


def test_a_renewed_certificate_is_served_at_the_next_handshake_and_a_half_written_one_is_not(tmp_path):
    ca = TestCA(tmp_path / "ca")
    first = ca.issue("gateway", file_stem="served")
    tls = ServerTls(str(first.cert), str(first.key))
    serials = [serial(first)]  # read now: each renewal rewrites the same files

    async def main():
        server = await serve(tls.ssl_context())
        port = server.sockets[0].getsockname()[1]
        try:
            seen = [await handshake(port, ca)]
            serials.append(serial(ca.issue("gateway", file_stem="served")))
            seen.append(await handshake(port, ca))
            (tmp_path / "ca" / "served.key").write_text("-----BEGIN PRIVATE KEY-----\nhalf-written")
            seen.append(await handshake(port, ca))
            serials.append(serial(ca.issue("gateway", file_stem="served")))  # the key arrived: files agree again
            seen.append(await handshake(port, ca))
            return seen, [serials[0], serials[1], serials[1], serials[2]]
        finally:
            server.close()

    seen, expected = asyncio.run(main())
    assert seen == expected and len(set(expected)) == 3


def test_with_a_client_ca_a_client_without_a_certificate_is_refused(tmp_path):
    ca = TestCA(tmp_path / "ca")
    served, caller = ca.issue("gateway"), ca.issue("caller")
    tls = ServerTls(str(served.cert), str(served.key), str(ca.file))

    async def main():
        server = await serve(tls.ssl_context())
        port = server.sockets[0].getsockname()[1]
        try:
            return await handshake(port, ca), await handshake(port, ca, caller)
        finally:
            server.close()

    without, with_cert = asyncio.run(main())
    assert without in ("SSLError", "closed", "ConnectionResetError") and with_cert == serial(served)
