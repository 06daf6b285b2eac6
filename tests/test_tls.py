"""TLS on every hop, on real servers on loopback with certificates made here (tests/tls_certs.py):
the gateway's public port (TLS, optional mutual TLS, a renewed certificate taken without a restart),
and each internal hop (encoder, decoder, Triton, Redis) refusing a client without its certificate,
then one call through every hop on TLS. Refusals are TLS handshake failures: gRPC reports them as
UNAVAILABLE (no connection could be made), redis-py as a ConnectionError.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers import LocalRedis, free_port, triton_server
from tls_certs import TestCA
from vitaserve.common.settings import REDIS_URL_ENV, SettingsError
from vitaserve.common.tls import ClientTls, ServerTls, secure_or_insecure_channel

SERVING = health_pb2.HealthCheckResponse.SERVING


async def health(target: str, tls: ClientTls | None, timeout_s: float = 5.0) -> str:
    """'SERVING', or the gRPC status name of the failure (a refused handshake: UNAVAILABLE)."""
    channel = secure_or_insecure_channel(target, tls, [])
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        await channel.close()


def mutual(ca: TestCA, server) -> ServerTls:
    return ServerTls(str(server.cert), str(server.key), str(ca.file))


def client(ca: TestCA, identity=None) -> ClientTls:
    """Trusts `ca`; presents `identity` (CertFiles) when given."""
    if identity is None:
        return ClientTls(str(ca.file))
    return ClientTls(str(ca.file), str(identity.cert), str(identity.key))


def anonymous_flag(parser: argparse.ArgumentParser) -> list[str]:
    """--allow-anonymous where the gateway has it (caller authentication is another part of this
    issue): these tests are about the transport, not about callers."""
    return ["--allow-anonymous"] if "--allow-anonymous" in parser._option_string_actions else []


def gateway_args(ckpt, *flags: str, encoder="127.0.0.1:1", decoder="127.0.0.1:1", triton="127.0.0.1:1"):
    from vitaserve.gateway.settings import GatewaySettings

    parser = argparse.ArgumentParser()
    GatewaySettings.add_arguments(parser)
    return parser.parse_args(["--lm", str(ckpt / "lm"), "--encoder", encoder, "--decoder", decoder,
                              "--triton", triton, "--host", "127.0.0.1", "--port", "0", "--context-tokens", "1024",
                              *anonymous_flag(parser), *flags])


# ---- settings: TLS or an explicit --plaintext ---------------------------------------------------------
@pytest.mark.parametrize("service", ["encoder", "decoder", "gateway"])
def test_every_service_needs_tls_or_an_explicit_plaintext(service, tmp_path):
    from vitaserve.cli.serve import settings_class

    ca = TestCA(tmp_path)
    good = ca.issue("server")
    cls = settings_class(service)
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    required = {"encoder": ["--tokenizer", "t"], "decoder": ["--decoder", "d"],
                "gateway": ["--lm", "l", "--encoder", "e:1", "--decoder", "d:1", "--triton", "t:1",
                            *anonymous_flag(parser)]}[service]
    env = {REDIS_URL_ENV: "redis://127.0.0.1:1/0"}

    def settings(*flags):
        return cls.from_args(parser.parse_args([*required, *flags]), env)

    with pytest.raises(SettingsError, match="--tls-cert FILE --tls-key FILE.*or an explicit --plaintext"):
        settings()
    with pytest.raises(SettingsError, match="got only --tls-cert"):
        settings("--tls-cert", str(good.cert))
    with pytest.raises(SettingsError, match="contradict"):
        settings("--plaintext", "--tls-cert", str(good.cert), "--tls-key", str(good.key))
    with pytest.raises(SettingsError, match="does not belong to certificate"):
        settings("--tls-cert", str(good.cert), "--tls-key", str(ca.issue("other").key))
    assert settings("--plaintext").tls is None
    tls = settings("--tls-cert", str(good.cert), "--tls-key", str(good.key), "--tls-client-ca", str(ca.file)).tls
    assert tls == ServerTls(str(good.cert), str(good.key), str(ca.file)) and tls.mutual
    if service != "encoder":  # the Redis clients
        with pytest.raises(SettingsError, match="rediss://"):
            settings("--plaintext", "--redis-ca", str(ca.file))
        with pytest.raises(SettingsError, match="--redis-cert and --redis-key go together"):
            cls.from_args(parser.parse_args([*required, "--plaintext", "--redis-ca", str(ca.file), "--redis-cert",
                                              str(good.cert)]), {REDIS_URL_ENV: "rediss://127.0.0.1:1/0"})
    if service == "gateway":
        s = settings("--plaintext", "--internal-ca", str(ca.file), "--internal-cert", str(good.cert),
                     "--internal-key", str(good.key))
        assert s.internal_tls == ClientTls(str(ca.file), str(good.cert), str(good.key))
        with pytest.raises(SettingsError, match="need --internal-ca"):
            settings("--plaintext", "--internal-cert", str(good.cert), "--internal-key", str(good.key))


def test_the_cli_refuses_to_serve_without_a_choice(tmp_path):
    """The message a person sees: both choices named, one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(REDIS_URL_ENV)}
    done = subprocess.run([sys.executable, "-m", "vitaserve.cli", "serve", "encoder", "--tokenizer", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") <= 1
    assert "--tls-cert FILE --tls-key FILE" in done.stderr and "--plaintext" in done.stderr


# ---- the public edge: the gateway's port -------------------------------------------------------------
def test_gateway_edge_tls_refuses_plaintext_unknown_ca_expired_and_wrong_host_and_takes_a_renewed_cert(ckpt, tmp_path):
    """One gateway replica; its certificate files are rewritten while it runs (as cert-manager renews a
    mounted Secret), and each new connection gets what is on disk, without a restart."""
    from vitaserve.gateway.service import Gateway
    from vitaserve.gateway.settings import GatewaySettings

    ca, stranger = TestCA(tmp_path / "ca"), TestCA(tmp_path / "stranger", "stranger-ca")
    served = ca.issue("gateway", file_stem="served")  # the files the gateway is started with
    health_port = free_port()
    settings = GatewaySettings.from_args(gateway_args(ckpt, "--tls-cert", str(served.cert), "--tls-key",
                                                      str(served.key), "--health-port", str(health_port)),
                                         {REDIS_URL_ENV: "redis://127.0.0.1:1/0"})

    async def main():
        gateway = await Gateway.start(settings)
        target = f"127.0.0.1:{gateway.port}"
        try:
            seen = {"good": await health(target, client(ca)),
                    "plaintext": await health(target, None),
                    "unknown CA": await health(target, client(stranger)),
                    "no such name": await health(target, ClientTls(str(ca.file), server_name="other.example")),
                    "health port, plaintext": await health(f"127.0.0.1:{health_port}", None)}
            ca.issue("gateway", expired=True, file_stem="served")  # renewed... with an expired certificate
            seen["expired"] = await health(target, client(ca))
            ca.issue("gateway", hosts=("gateway.other.example",), file_stem="served")
            seen["wrong host"] = await health(target, client(ca))
            stranger.issue("gateway", file_stem=str(tmp_path / "ca" / "served"))  # a renewal, by another CA
            seen["renewed, new CA"] = await health(target, client(stranger))
            seen["renewed, old CA"] = await health(target, client(ca))
            (tmp_path / "ca" / "served.key").write_text("-----BEGIN PRIVATE KEY-----\nhalf-written")
            seen["half-written key: previous cert"] = await health(target, client(stranger))
            return seen
        finally:
            await gateway.stop(0)

    seen = asyncio.run(main())
    assert seen == {"good": "SERVING", "plaintext": "UNAVAILABLE", "unknown CA": "UNAVAILABLE",
                    "no such name": "UNAVAILABLE", "health port, plaintext": "SERVING", "expired": "UNAVAILABLE",
                    "wrong host": "UNAVAILABLE", "renewed, new CA": "SERVING", "renewed, old CA": "UNAVAILABLE",
                    "half-written key: previous cert": "SERVING"}


def test_gateway_edge_mutual_tls_refuses_callers_without_a_good_certificate(ckpt, tmp_path):
    from vitaserve.gateway.service import Gateway
    from vitaserve.gateway.settings import GatewaySettings

    ca, stranger = TestCA(tmp_path / "ca"), TestCA(tmp_path / "stranger", "stranger-ca")
    served = ca.issue("gateway")
    settings = GatewaySettings.from_args(
        gateway_args(ckpt, "--tls-cert", str(served.cert), "--tls-key", str(served.key), "--tls-client-ca", str(ca.file)),
        {REDIS_URL_ENV: "redis://127.0.0.1:1/0"})

    async def main():
        gateway = await Gateway.start(settings)
        target = f"127.0.0.1:{gateway.port}"
        try:
            return {"caller certificate": await health(target, client(ca, ca.issue("platform"))),
                    "none": await health(target, client(ca)),
                    "expired": await health(target, client(ca, ca.issue("old", expired=True))),
                    "from another CA": await health(target, client(ca, stranger.issue("intruder")))}
        finally:
            await gateway.stop(0)

    assert asyncio.run(main()) == {"caller certificate": "SERVING", "none": "UNAVAILABLE", "expired": "UNAVAILABLE",
                                   "from another CA": "UNAVAILABLE"}


# ---- internal hops -------------------------------------------------------------------------------------
def test_redis_over_tls_refuses_clients_without_its_certificate(tmp_path):
    import redis.exceptions

    from vitaserve.common.session_store import connect_redis

    ca, stranger = TestCA(tmp_path / "ca"), TestCA(tmp_path / "stranger", "stranger-ca")
    me, intruder = ca.issue("decoder"), stranger.issue("intruder")
    server = LocalRedis(tmp_path / "redis", tls=mutual(ca, ca.issue("redis")), probe=client(ca, me)).start()
    try:
        assert server.url.startswith("rediss://")
        plain_url = server.url.replace("rediss://", "redis://")

        async def ping(url, tls):
            r = connect_redis(url, tls=tls, timeout_s=2.0)
            try:
                return await r.ping()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                return type(exc).__name__
            finally:
                await r.aclose()

        async def main():
            return {"certificate": await ping(server.url, client(ca, me)),
                    "none": await ping(server.url, client(ca)),
                    "unknown server CA": await ping(server.url, client(stranger, stranger.issue("x"))),
                    "certificate from another CA": await ping(server.url, ClientTls(
                        str(ca.file), str(intruder.cert), str(intruder.key))),
                    "plaintext": await ping(plain_url, None)}

        seen = asyncio.run(main())
    finally:
        server.stop()
    assert seen["certificate"] is True
    assert all(seen[k] in ("ConnectionError", "TimeoutError") for k in seen if k != "certificate"), seen


def test_every_internal_hop_on_mutual_tls_refuses_a_client_without_its_certificate_and_a_call_crosses_them_all(
        ckpt, tmp_path, utterance):
    """Encoder, decoder, Triton and Redis each require a client certificate from the cluster's CA: a
    client without one is refused by each. Then a gateway serving TLS, holding the certificate,
    answers a mu-law call through all of them."""
    from vitaserve.client.phone import run_call
    from vitaserve.common.session_store import connect_redis
    from vitaserve.decoder.audio_decoder import AudioDecoder
    from vitaserve.decoder.service import decoder_replica
    from vitaserve.decoder.settings import DecoderSettings
    from vitaserve.decoder.state_store import DecoderStateStore
    from vitaserve.encoder.service import encoder_replica
    from vitaserve.encoder.settings import EncoderSettings
    from vitaserve.encoder.tokenizer import SpeechTokenizer
    from vitaserve.gateway.backends import DecoderClient, EncoderClient
    from vitaserve.gateway.generator_client import GeneratorClient
    from vitaserve.gateway.service import Gateway
    from vitaserve.gateway.settings import GatewaySettings
    from vitaserve.generator.contract import GenerationOptions

    ca = TestCA(tmp_path / "ca")
    server, me = ca.issue("service"), ca.issue("gateway")
    hop_tls, good, no_cert = mutual(ca, server), client(ca, me), client(ca)
    redis = LocalRedis(tmp_path / "redis", tls=hop_tls, probe=good).start()
    try:
        with triton_server(tmp_path / "triton", ckpt / "lm", num_slots=2, tls=hop_tls) as triton:
            async def main():
                tokenizer = await asyncio.to_thread(SpeechTokenizer.from_pretrained, str(ckpt / "tokenizer"))
                encoder, _ = encoder_replica(EncoderSettings(tokenizer="-", port=0, host="127.0.0.1", tls=hop_tls),
                                             tokenizer)
                model = await asyncio.to_thread(AudioDecoder.from_pretrained, str(ckpt / "decoder"))
                dsettings = DecoderSettings(decoder="-", redis_url=redis.url, port=0, host="127.0.0.1",
                                            deterministic=True, tls=hop_tls, redis_tls=good)
                decoder, _ = decoder_replica(dsettings, model, DecoderStateStore(
                    connect_redis(redis.url, tls=good)))
                await encoder.start()
                await decoder.start()
                enc, dec = f"127.0.0.1:{encoder.port}", f"127.0.0.1:{decoder.port}"
                gateway = None
                try:
                    seen = {}
                    for who, tls in (("certificate", good), ("none", no_cert)):
                        seen[who] = {"encoder": await health(enc, tls), "decoder": await health(dec, tls),
                                     "triton": await generate(triton["grpc"], tls),
                                     "encoder Encode": await rpc(EncoderClient(enc, tls=tls, attempts=1),
                                                                 lambda c: c.encode(np.zeros(16000, np.float32))),
                                     "decoder DecodeBlock": await rpc(
                                         DecoderClient(dec, tls=tls, attempts=1),
                                         lambda c: c.decode_block("s" * 16, 0, [1] * 10, True))}
                    args = gateway_args(ckpt, "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                                        "--internal-ca", str(ca.file), "--internal-cert", str(me.cert),
                                        "--internal-key", str(me.key), "--redis-ca", str(ca.file),
                                        "--redis-cert", str(me.cert), "--redis-key", str(me.key),
                                        encoder=enc, decoder=dec, triton=triton["grpc"])
                    gateway = await Gateway.start(GatewaySettings.from_args(args, {REDIS_URL_ENV: redis.url}))
                    call = await run_call(f"127.0.0.1:{gateway.port}", [utterance], 8000, "mulaw", max_new_tokens=40,
                                          greedy=True, turn_timeout_s=120, tls=ClientTls(str(ca.file)))
                    return seen, call
                finally:
                    if gateway is not None:
                        await gateway.stop(0)
                    await decoder.stop(0)
                    await encoder.stop(0)

            async def generate(target, tls):
                generator = GeneratorClient(target, tls=tls)
                try:
                    tokens = [t async for t in generator.generate([1, 2, 3], GenerationOptions(max_new_tokens=3))]
                    return "OK" if tokens else "no tokens"
                except Exception as exc:  # tritonclient's InferenceServerException or a gRPC error
                    return "refused" if "UNAVAILABLE" in str(exc) or "unavailable" in str(exc).lower() else repr(exc)
                finally:
                    await generator.close()

            async def rpc(backend, call):
                try:
                    await call(backend)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                finally:
                    await backend.close()

            seen, call = asyncio.run(main())
    finally:
        redis.stop()
    assert seen["certificate"] == {"encoder": "SERVING", "decoder": "SERVING", "triton": "OK",
                                   "encoder Encode": "OK", "decoder DecodeBlock": "OK"}, seen
    assert seen["none"] == {"encoder": "UNAVAILABLE", "decoder": "UNAVAILABLE", "triton": "refused",
                            "encoder Encode": "UNAVAILABLE", "decoder DecodeBlock": "UNAVAILABLE"}, seen
    assert call.status == "OK", (call.status, call.details)
    (turn,) = call.turns
    assert not turn.error and turn.first_audio_ms is not None and turn.chunks > 0 and len(turn.audio) > 0


def test_local_cluster_on_tls_serves_every_hop_with_certificates(ckpt, tmp_path):
    """LocalCluster(tls=True) (the load test's --local --tls) starts the processes with the TLS flags:
    their ports refuse plaintext and clients without the client certificate, and Redis speaks rediss://."""
    from vitaserve.devcluster.cluster import LocalCluster

    cluster = LocalCluster(ckpt / "lm", ckpt / "tokenizer", ckpt / "decoder", workdir=tmp_path, grace_s=2, tls=True)
    try:
        cluster.start(180, services=("redis", "encoder", "decoder"))
        assert cluster.redis_url.startswith("rediss://")

        async def main():
            return {name: (await health(cluster.service(name).address, cluster.client_tls()),
                           await health(cluster.service(name).address, cluster.caller_tls()),
                           await health(cluster.service(name).address, None))
                    for name in ("encoder", "decoder")}

        seen = asyncio.run(main())
        argv = {s.name: s.proc.args for s in cluster.services}
    finally:
        cluster.stop()
    assert seen == {name: ("SERVING", "UNAVAILABLE", "UNAVAILABLE") for name in ("encoder", "decoder")}
    assert "--tls-client-ca" in argv["encoder"] and "--redis-cert" in argv["decoder"]
    assert "--plaintext" not in argv["encoder"] + argv["decoder"]
    assert [s.proc.returncode for s in cluster.spawned] == [0, 0, 0]  # drained and exited by themselves
