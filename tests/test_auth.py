"""Issue 13 item 3, caller authentication: API keys (stored hashed, bound to a tenant, reloaded) and
JWTs verified offline (RS256, ES256, EdDSA from a JWKS chosen by kid; issuer, audience, expiry).
The verifier directly, then a real gateway on loopback: missing or bad credentials are
UNAUTHENTICATED, a credential without the RPC's scope PERMISSION_DENIED, health needs none."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve.api import audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.common.settings import REDIS_URL_ENV, SettingsError
from vitaserve.gateway import auth as auth_mod
from vitaserve.gateway.auth import (API_KEYS_FILE_ENV, AuthConfigError, AuthError, Authenticator, JwtRules,
                                    hash_key)

ISSUER, AUDIENCE = "https://idp.test", "vita-gateway"
UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


# ---- keys and tokens made here, with `cryptography` --------------------------------------------------

class Signer:
    """One asymmetric key pair: its public JWK (kid) and tokens signed with its private key."""

    def __init__(self, alg: str, kid: str):
        self.alg, self.kid = alg, kid
        self.private = {"RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
                        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
                        "EdDSA": ed25519.Ed25519PrivateKey.generate}[alg]()
        algorithm = jwt.get_algorithm_by_name(alg)
        self.jwk = {**json.loads(algorithm.to_jwk(self.private.public_key())), "kid": kid, "use": "sig"}
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, tenant: str = "acme", *, exp_in: float = 300, aud: str = AUDIENCE, iss: str = ISSUER,
              kid: str | None = None, **claims) -> str:
        now = int(time.time())
        payload = {"iss": iss, "aud": aud, "sub": "caller-1", "iat": now, "exp": now + int(exp_in), "tenant": tenant,
                   **claims}
        return jwt.encode(payload, self.private, algorithm=self.alg, headers={"kid": kid or self.kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict, payload: dict, secret: bytes | None) -> str:
    """A token pyjwt will not make: `none` (no signature) or HS256 keyed with a public key's PEM."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


@pytest.fixture(scope="module")
def signers():
    return {alg: Signer(alg, f"key-{alg.lower()}") for alg in ("RS256", "ES256", "EdDSA")}


API_KEYS = {"acme": "vk_acme_" + "a" * 40, "globex": "vk_globex_" + "b" * 40, "tts-only": "vk_tts_" + "c" * 40}


def write_credentials(tmp_path, signers, tenants: dict | None = None) -> tuple[str, str]:
    """(API keys file, JWKS file): keys stored as sha256 only."""
    keys_file, jwks_file = tmp_path / "api-keys.json", tmp_path / "jwks.json"
    entries = [{"id": "k-acme", "tenant": "acme", "sha256": hash_key(API_KEYS["acme"])},
               {"id": "k-globex", "tenant": "globex", "sha256": hash_key(API_KEYS["globex"])},
               {"id": "k-tts", "tenant": "acme", "sha256": hash_key(API_KEYS["tts-only"]), "scopes": ["synthesize"]}]
    keys_file.write_text(json.dumps({"keys": entries, "tenants": tenants or {}}))
    jwks_file.write_text(json.dumps({"keys": [s.jwk for s in signers.values()]}))
    return str(keys_file), str(jwks_file)


def authenticator(tmp_path, signers, leeway_s: float = 5.0) -> Authenticator:
    keys_file, jwks_file = write_credentials(tmp_path, signers)
    return Authenticator(keys_file, jwks_file, JwtRules(ISSUER, AUDIENCE, "tenant", leeway_s))


def refused(a: Authenticator, metadata, rpc: str = "converse") -> AuthError:
    with pytest.raises(AuthError) as info:
        a.authenticate(metadata, rpc)
    return info.value


# ---- the verifier, directly ----------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_a_jwt_signed_by_a_configured_key_names_its_tenant_and_scopes(tmp_path, signers, alg):
    a = authenticator(tmp_path, signers)
    caller = a.authenticate([("authorization", f"Bearer {signers[alg].token('globex')}")], "converse")
    assert (caller.tenant, caller.scopes, caller.credential) == ("globex", auth_mod.SCOPES, f"jwt:key-{alg.lower()}")
    scoped = signers[alg].token("globex", scope="openid synthesize")
    assert a.authenticate([("authorization", f"Bearer {scoped}")], "synthesize").scopes == {"synthesize"}
    assert refused(a, [("authorization", f"Bearer {scoped}")], "converse").code == PERMISSION_DENIED


def test_every_bad_jwt_is_unauthenticated_and_says_why_without_echoing_it(tmp_path, signers):
    a = authenticator(tmp_path, signers)
    rs = signers["RS256"]
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "tenant": "acme"}
    stranger = Signer("RS256", rs.kid)  # same kid, a key the gateway does not have
    cases = {
        "none": (forged({"alg": "none", "kid": rs.kid, "typ": "JWT"}, claims, None), "algorithm"),
        "HS256 keyed with the public key": (forged({"alg": "HS256", "kid": rs.kid}, claims, rs.public_pem), "algorithm"),
        "expired beyond the leeway": (rs.token(exp_in=-60), "expired"),
        "wrong audience": (rs.token(aud="another-service"), "audience"),
        "wrong issuer": (rs.token(iss="https://evil.test"), "issuer"),
        "unknown kid": (rs.token(kid="key-nobody"), "kid"),
        "signed by another key": (stranger.token(), "signature"),
        "alg of another key type": (signers["ES256"].token(kid=rs.kid), "does not match"),
        "no tenant claim": (jwt.encode({k: v for k, v in claims.items() if k != "tenant"}, rs.private, "RS256",
                                       headers={"kid": rs.kid}), "tenant"),
        "no exp": (jwt.encode({k: v for k, v in claims.items() if k != "exp"}, rs.private, "RS256",
                              headers={"kid": rs.kid}), "exp"),
        "not a JWT": ("hello", "not a JWT"),
    }
    for name, (token, words) in cases.items():
        err = refused(a, [("authorization", f"Bearer {token}")])
        assert err.code == UNAUTHENTICATED, name
        assert words in str(err), (name, str(err))
        assert token not in str(err), name
    # within the leeway (5 s here) an expired token still passes: clocks of issuer and gateway differ
    assert a.authenticate([("authorization", f"Bearer {rs.token(exp_in=-2)}")], "converse").tenant == "acme"
    assert refused(a, [("authorization", "Basic abc")]).code == UNAUTHENTICATED


def test_api_keys_are_bound_to_tenants_scoped_and_never_echoed(tmp_path, signers):
    a = authenticator(tmp_path, signers)
    caller = a.authenticate([("x-api-key", API_KEYS["acme"])], "transcribe")
    assert (caller.tenant, caller.credential) == ("acme", "api-key:k-acme")
    assert a.authenticate([("x-api-key", API_KEYS["tts-only"])], "synthesize").tenant == "acme"
    err = refused(a, [("x-api-key", API_KEYS["tts-only"])], "converse")
    assert err.code == PERMISSION_DENIED and "synthesize" in str(err)
    for metadata in ([], [("x-api-key", "vk_guess")], [("x-api-key", "")],
                     [("x-api-key", API_KEYS["acme"]), ("authorization", "Bearer x")]):
        err = refused(a, metadata)
        assert err.code == UNAUTHENTICATED and API_KEYS["acme"] not in str(err)
    assert "no credentials" in str(refused(a, []))
    # the file holds hashes only: the key itself is not a valid entry
    assert API_KEYS["acme"] not in open(a.api_keys.path).read()


def test_key_files_are_reloaded_when_they_change_and_a_broken_update_keeps_the_last_good(tmp_path, signers,
                                                                                          monkeypatch):
    monkeypatch.setattr(auth_mod, "RELOAD_CHECK_S", 0.0)
    a = authenticator(tmp_path, signers)
    new_key = "vk_rotated_" + "d" * 40
    path = a.api_keys.path
    doc = json.loads(open(path).read())
    doc["keys"] = [{"id": "k-new", "tenant": "initech", "sha256": hash_key(new_key)}]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)  # as a Secret update swaps the file
    assert a.authenticate([("x-api-key", new_key)], "converse").tenant == "initech"
    assert refused(a, [("x-api-key", API_KEYS["acme"])]).code == UNAUTHENTICATED  # revoked
    with open(path, "w") as f:
        f.write("{not json")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert a.authenticate([("x-api-key", new_key)], "converse").tenant == "initech"
    # a JWKS update: the RS256 key removed
    jwks = json.loads(open(a.jwks.path).read())
    jwks["keys"] = [k for k in jwks["keys"] if k["kid"] != "key-rs256"]
    with open(a.jwks.path + ".tmp", "w") as f:
        json.dump(jwks, f)
    os.replace(a.jwks.path + ".tmp", a.jwks.path)
    assert "kid" in str(refused(a, [("authorization", f"Bearer {signers['RS256'].token()}")]))
    assert a.authenticate([("authorization", f"Bearer {signers['EdDSA'].token()}")], "converse").tenant == "acme"


def test_unusable_key_files_are_refused_at_start(tmp_path, signers):
    jwks = tmp_path / "bad-jwks.json"
    for keys_list, words in (([{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}], "public keys"),
                             ([{**signers["RS256"].jwk, "kid": ""}], "kid"),
                             ([{**signers["RS256"].jwk, "alg": "RS512"}], "not allowed")):
        jwks.write_text(json.dumps({"keys": keys_list}))
        with pytest.raises(AuthConfigError, match=words):
            Authenticator(jwks_file=str(jwks), jwt_rules=JwtRules(ISSUER, AUDIENCE))
    keys_file = tmp_path / "bad-keys.json"
    for doc, words in (({"keys": [{"id": "k", "tenant": "acme", "sha256": "vk_plain_key"}]}, "never the key"),
                       ({"keys": [{"id": "k", "tenant": "a b", "sha256": "0" * 64}]}, "tenant"),
                       ({"keys": [], "tenants": {"acme": {"max_calls": -1}}}, "max_calls")):
        keys_file.write_text(json.dumps(doc))
        with pytest.raises(AuthConfigError, match=words):
            Authenticator(api_keys_file=str(keys_file))


def gateway_cli(*extra: str):
    from vitaserve.gateway.settings import GatewaySettings

    parser = argparse.ArgumentParser()
    GatewaySettings.add_arguments(parser)
    return parser.parse_args(["--lm", "lm", "--encoder", "e:1", "--decoder", "d:1", "--triton", "t:1",
                              "--plaintext", *extra])


def test_a_gateway_with_no_way_to_authenticate_refuses_to_start(tmp_path, signers):
    from vitaserve.gateway.deps import build_auth
    from vitaserve.gateway.settings import GatewaySettings

    env = {REDIS_URL_ENV: "redis://127.0.0.1:1/0"}
    with pytest.raises(SettingsError, match="--allow-anonymous"):
        build_auth(GatewaySettings.from_args(gateway_cli(), env))
    with pytest.raises(SettingsError, match="--jwt-issuer and --jwt-audience"):
        GatewaySettings.from_args(gateway_cli("--jwks-file", "x.json"), env)
    keys_file, jwks_file = write_credentials(tmp_path, signers)
    s = GatewaySettings.from_args(gateway_cli("--jwks-file", jwks_file, "--jwt-issuer", ISSUER, "--jwt-audience",
                                              AUDIENCE, "--jwt-leeway-s", "10"), {**env, API_KEYS_FILE_ENV: keys_file})
    a = build_auth(s)
    assert a.api_keys.path == keys_file and a.jwt_rules == JwtRules(ISSUER, AUDIENCE, "tenant", 10.0)
    assert not a.allow_anonymous
    assert build_auth(GatewaySettings.from_args(gateway_cli("--allow-anonymous"), env)).allow_anonymous


# ---- a real gateway on loopback --------------------------------------------------------------------------

def start_gateway(cluster, name: str, env: dict, *flags: str):
    """A gateway replica on the cluster's loop, started as a pod is (flags, secrets in the environment),
    without --allow-anonymous unless asked; returns (gateway, address)."""
    from vitaserve.gateway.service import Gateway
    from vitaserve.gateway.settings import GatewaySettings
    from cluster import TRITON_MAX_LEN

    args = gateway_cli("--encoder", f"127.0.0.1:{cluster.encoder.port}", "--decoder", cluster.decoder_target,
                       "--triton", cluster.triton_grpc, "--lm", str(cluster.ckpt / "lm"), "--host", "127.0.0.1",
                       "--port", "0", "--replica-id", name, "--mode", "boost", "--max-utterance-s", "8",
                       "--context-tokens", str(TRITON_MAX_LEN), *flags)
    settings = GatewaySettings.from_args(args, {REDIS_URL_ENV: cluster.redis_url, **env})
    gateway = cluster.run(Gateway.start(settings))
    return gateway, f"127.0.0.1:{gateway.port}"


@pytest.fixture(scope="module")
def secured(cluster, tmp_path_factory, signers):
    keys_file, jwks_file = write_credentials(tmp_path_factory.mktemp("creds"), signers)
    gateway, target = start_gateway(cluster, "gw-auth", {API_KEYS_FILE_ENV: keys_file}, "--jwks-file", jwks_file,
                                    "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE)
    try:
        yield target
    finally:
        cluster.run(gateway.stop(0))


def test_the_gateway_refuses_calls_without_good_credentials_and_serves_good_ones(secured, signers):
    async def main():
        async with grpc.aio.insecure_channel(secured) as channel:
            stub = conversation_pb2_grpc.ConversationStub(channel)
            synth = pb.SynthesizeRequest(text="Hello there.", max_new_tokens=20,
                                         sampling=audio_pb2.SamplingOptions(greedy=True))
            outcomes = {}
            for name, metadata in {
                "none": None,
                "unknown key": (("x-api-key", "vk_guess"),),
                "expired JWT": (("authorization", f"Bearer {signers['ES256'].token(exp_in=-120)}"),),
                "wrong audience": (("authorization", f"Bearer {signers['EdDSA'].token(aud='other')}"),),
                "scope": (("x-api-key", API_KEYS["tts-only"]),),
            }.items():
                try:
                    async for _ in stub.Converse(iter([pb.ConverseRequest(config=pb.CallConfig(
                            input_format=audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_MULAW,
                                                               sample_rate=8000)))]), metadata=metadata, timeout=20):
                        pass
                    outcomes[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    outcomes[name] = exc.code()
            for name, metadata in {"synth none": None, "synth bad": (("x-api-key", "nope"),)}.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.Synthesize(synth, metadata=metadata, timeout=20):
                        pass
                outcomes[name] = info.value.code()
            good = [m async for m in stub.Synthesize(synth, metadata=(("x-api-key", API_KEYS["tts-only"]),),
                                                     timeout=60)]
            jwt_good = [m async for m in stub.Synthesize(
                synth, metadata=(("authorization", f"Bearer {signers['RS256'].token('globex')}"),), timeout=60)]
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return outcomes, good, jwt_good, health

    outcomes, good, jwt_good, health = asyncio.run(main())
    assert outcomes == {"none": UNAUTHENTICATED, "unknown key": UNAUTHENTICATED, "expired JWT": UNAUTHENTICATED,
                        "wrong audience": UNAUTHENTICATED, "scope": PERMISSION_DENIED,
                        "synth none": UNAUTHENTICATED, "synth bad": UNAUTHENTICATED}
    for messages in (good, jwt_good):
        assert messages[-1].WhichOneof("message") == "finished" and any(m.audio.data for m in messages[:-1])
    assert health.status == health_pb2.HealthCheckResponse.SERVING
