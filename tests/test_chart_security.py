"""The chart's security values (issue 13 item 7), rendered by helm and validated like the rest: TLS on
every hop (cert-manager Certificates or existing Secrets), caller credentials from Secrets, Redis with
an ACL user and TLS, egress NetworkPolicies (each pod reaches only what it calls, plus DNS), Triton's
HTTP and metrics ports closed to all but their scrapers."""

from __future__ import annotations

import base64
import json

import kubernetes_validate
import pytest

from test_helm_chart import (CHART, CRD_GROUPS, HELM, SERVICES, by_kind, declared_kube_version, helm, render,
                             values_of)

pytestmark = pytest.mark.skipif(HELM is None, reason="helm is not installed (scripts/install_helm.sh)")

TLS_DIR = "/etc/vita/tls"
# every secret configured: existing TLS Secrets, callers' mTLS CA, API keys, JWKS, quotas, retention
EVERYTHING = ("--set", "tls.source=existingSecrets",
              *[x for i in ("public", "gateway", "encoder", "decoder", "triton", "redis")
                for x in ("--set", f"tls.existingSecrets.{i}=my-{i}-tls")],
              "--set", "tls.clientCaSecret=callers-ca", "--set", "auth.jwt.jwksSecret=my-jwks",
              "--set", "auth.jwt.issuer=https://idp.example", "--set", "auth.jwt.audience=vita-audio",
              "--set", "auth.quota.maxCalls=20", "--set", "auth.quota.callsPerMinute=120",
              "--set", "gateway.historyTtlSeconds=3600", "--set", "gateway.storeText=false")


def container(docs: list[dict], component: str) -> dict:
    workload = by_kind(docs, "StatefulSet" if component == "redis" else "Deployment")[component]
    return workload["spec"]["template"]["spec"]["containers"][0]


def volumes(docs: list[dict], component: str) -> dict[str, dict]:
    workload = by_kind(docs, "StatefulSet" if component == "redis" else "Deployment")[component]
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def mounted_secret(docs: list[dict], component: str, path: str) -> str:
    """The Secret whose volume is mounted at the folder holding `path` in the component's container."""
    c = container(docs, component)
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    return volumes(docs, component)[mount["name"]]["secret"]["secretName"]


def flags(c: dict) -> dict[str, str]:
    return dict(a.split("=", 1) if "=" in a else (a, "") for a in c["args"] if a.startswith("--"))


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def everything() -> list[dict]:
    return render(*EVERYTHING)


def test_secure_renders_validate(everything):
    for docs in (everything, render("--set", "tls.enabled=false", "--set", "auth.allowAnonymous=true"),
                 render("--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=r",
                        "--set", "externalRedis.tlsSecret=r-tls", "--set", "externalRedis.tlsClientCert=true")):
        for doc in docs:
            if not doc["apiVersion"].startswith(CRD_GROUPS):
                kubernetes_validate.validate(doc, declared_kube_version(), strict=True)


def test_every_hop_requires_tls_by_default(default):
    """Gateway: TLS to callers, a client identity of the internal CA to encoder, decoder, Triton and
    Redis; encoder, decoder, Triton and Redis require a client certificate of that CA."""
    gw = flags(container(default, "gateway"))
    assert {"--tls-cert", "--tls-key", "--internal-ca", "--internal-cert", "--internal-key", "--redis-ca",
            "--redis-cert", "--redis-key"} <= set(gw) and "--plaintext" not in gw
    assert "--tls-client-ca" not in gw  # callers authenticate by API key / JWT unless tls.clientCaSecret
    assert mounted_secret(default, "gateway", gw["--tls-cert"]) == "vita-vita-audio-tls-public"
    assert mounted_secret(default, "gateway", gw["--internal-cert"]) == "vita-vita-audio-tls-gateway"
    for component in ("encoder", "decoder"):
        f = flags(container(default, component))
        assert f["--tls-client-ca"].startswith(TLS_DIR) and "--plaintext" not in f
        assert mounted_secret(default, component, f["--tls-cert"]) == f"vita-vita-audio-tls-{component}"
    dec = flags(container(default, "decoder"))
    assert mounted_secret(default, "decoder", dec["--redis-cert"]) == "vita-vita-audio-tls-decoder"
    triton = flags(container(default, "triton"))
    assert triton["--grpc-use-ssl"] == "true" and triton["--grpc-use-ssl-mutual"] == "true"
    assert mounted_secret(default, "triton", triton["--grpc-root-cert"]) == "vita-vita-audio-tls-triton"
    redis = container(default, "redis")["args"]
    pairs = dict(zip(redis[1::2], redis[2::2]))
    assert pairs["--port"] == "0" and pairs["--tls-port"] == "6379" and pairs["--tls-auth-clients"] == "yes"
    assert mounted_secret(default, "redis", pairs["--tls-ca-cert-file"]) == "vita-vita-audio-tls-redis"
    probe = container(default, "redis")["readinessProbe"]["exec"]["command"]
    assert probe[0] == "redis-cli" and "--tls" in probe and "--user" in probe


def test_certificates_name_what_the_gateway_dials(default):
    """The chart's own CA (no issuerRef) signs one Certificate per identity; each server's names hold
    the host the gateway dials, so the gateway's hostname check passes; usages fit each side."""
    certs = {d["metadata"]["name"]: d["spec"] for d in default if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d["spec"] for d in default if d["kind"] == "Issuer"}
    assert issuers["vita-vita-audio-ca"] == {"ca": {"secretName": "vita-vita-audio-ca"}}
    assert certs["vita-vita-audio-ca"]["isCA"] and "selfSigned" in issuers["vita-vita-audio-selfsigned"]
    gw = flags(container(default, "gateway"))
    dialled = {"encoder": gw["--encoder"], "decoder": gw["--decoder"], "triton": gw["--triton"]}
    for identity in ("public", "gateway", "encoder", "decoder", "triton", "redis"):
        spec = certs[f"vita-vita-audio-tls-{identity}"]
        assert spec["secretName"] == f"vita-vita-audio-tls-{identity}"
        assert spec["issuerRef"]["name"] == "vita-vita-audio-ca" and spec["renewBefore"]
        if identity in dialled:
            host = dialled[identity].removeprefix("dns:///").rsplit(":", 1)[0]
            assert host in spec["dnsNames"], f"{identity}: the gateway dials {host}"
        assert ("server auth" in spec["usages"]) == (identity != "gateway")
        assert ("client auth" in spec["usages"]) == (identity in ("gateway", "decoder", "redis"))
    assert "vita-vita-audio-gateway.voice.svc.cluster.local" in certs["vita-vita-audio-tls-public"]["dnsNames"]
    named = render("--set", "tls.publicDnsNames={voice.example.com}", "--set-json",
                   'tls.certManager.publicIssuerRef={"name":"letsencrypt","kind":"ClusterIssuer"}')
    (public,) = [d["spec"] for d in named if d["kind"] == "Certificate" and d["metadata"]["name"].endswith("-public")]
    assert "voice.example.com" in public["dnsNames"] and public["issuerRef"]["name"] == "letsencrypt"


def test_existing_secrets_and_callers_ca(everything):
    assert not [d for d in everything if d["kind"] in ("Certificate", "Issuer")]
    gw = flags(container(everything, "gateway"))
    assert mounted_secret(everything, "gateway", gw["--tls-cert"]) == "my-public-tls"
    assert mounted_secret(everything, "gateway", gw["--internal-key"]) == "my-gateway-tls"
    assert mounted_secret(everything, "gateway", gw["--tls-client-ca"]) == "callers-ca"
    for component in ("encoder", "decoder", "triton", "redis"):
        c = container(everything, component)
        path = next(a.split("=", 1)[1] if "=" in a else c["args"][c["args"].index(a) + 1]
                    for a in c["args"] if a.startswith(("--tls-cert", "--grpc-server-cert", "--tls-cert-file")))
        assert mounted_secret(everything, component, path) == f"my-{component}-tls"
    result = helm("template", "vita", str(CHART), "--set", "tls.source=existingSecrets", check=False)
    assert result.returncode != 0 and "tls.existingSecrets.public" in result.stderr


def test_plaintext_only_when_asked():
    docs = render("--set", "tls.enabled=false")
    assert not [d for d in docs if d["kind"] in ("Certificate", "Issuer")]
    for component in SERVICES:
        f = flags(container(docs, component))
        assert "--plaintext" in f and not {k for k in f if k.startswith(("--tls", "--internal", "--redis-"))}
    assert not [a for a in container(docs, "triton")["args"] if "ssl" in a]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert base64.b64decode(secret["data"]["redis-url"]).decode().startswith("redis://vita:")


def test_caller_credentials_come_from_secrets(default, everything):
    c = container(default, "gateway")
    env = {e["name"]: e for e in c["env"]}
    keys_file = env["VITA_API_KEYS_FILE"]["value"]
    assert mounted_secret(default, "gateway", keys_file) == "vita-audio-api-keys"
    assert "--allow-anonymous" not in c["args"]
    f = flags(container(everything, "gateway"))
    assert mounted_secret(everything, "gateway", f["--jwks-file"]) == "my-jwks"
    assert (f["--jwt-issuer"], f["--jwt-audience"], f["--jwt-tenant-claim"], f["--jwt-leeway-s"]) == (
        "https://idp.example", "vita-audio", "tenant", "30")
    assert (f["--tenant-max-calls"], f["--tenant-calls-per-minute"]) == ("20", "120")
    assert f["--history-ttl-s"] == "3600" and "--no-store-text" in f
    # no credentials configured and no explicit anonymous access: refused at render time
    result = helm("template", "vita", str(CHART), "--set", "auth.apiKeys.existingSecret=", check=False)
    assert result.returncode != 0 and "auth.apiKeys.existingSecret" in result.stderr
    anonymous = render("--set", "auth.apiKeys.existingSecret=", "--set", "auth.allowAnonymous=true")
    assert "--allow-anonymous" in container(anonymous, "gateway")["args"]


def _egress_components(policy: dict) -> dict[int, set[str]]:
    """port -> components (or '<dns>'/'<other>') the policy lets the pod reach."""
    reach: dict[int, set[str]] = {}
    for rule in policy["spec"]["egress"]:
        for port in rule["ports"]:
            for peer in rule.get("to", [{"<anyone>": True}]):
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                name = labels.get("app.kubernetes.io/component") or ("<dns>" if labels.get("k8s-app") == "kube-dns"
                                                                     else "<other>")
                reach.setdefault(port["port"], set()).add(name)
    return reach


@pytest.mark.parametrize("args", [(), EVERYTHING], ids=["default", "everything"])
def test_each_pod_reaches_only_what_it_calls(args):
    docs = render(*args)
    policies = by_kind(docs, "NetworkPolicy")
    dns = {53: {"<dns>"}}
    expected = {"gateway": {**dns, 50052: {"encoder"}, 50053: {"decoder"}, 8001: {"triton"}, 6379: {"redis"}},
                "decoder": {**dns, 6379: {"redis"}}, "encoder": dns, "triton": dns, "redis": dns}
    for component, reach in expected.items():
        assert policies[component]["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert _egress_components(policies[component]) == reach, component
    # every workload of the chart is selected by a policy with egress (the helm test pod runs once)
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        policy = policies[labels["app.kubernetes.io/component"]]["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items() and "egress" in policy


def test_triton_http_and_metrics_reachable_only_by_scrapers(default):
    triton = by_kind(default, "NetworkPolicy")["triton"]["spec"]["ingress"]
    by_port = {p["port"]: rule.get("from") for rule in triton for p in rule["ports"]}
    assert 8000 not in by_port, "Triton's HTTP port (probes by the kubelet only) is open to pods"
    assert by_port[8002] == [{"namespaceSelector": {}}]  # networkPolicy.metricsFrom
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in by_port[8001]] == ["gateway"]
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    docs = render("--set-json", f"networkPolicy.metricsFrom={json.dumps(scrapers)}")
    triton = by_kind(docs, "NetworkPolicy")["triton"]["spec"]["ingress"]
    assert {p["port"]: rule.get("from") for rule in triton for p in rule["ports"]}[8002] == scrapers


def test_external_redis_over_tls():
    docs = render("--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=r",
                  "--set", "externalRedis.tlsSecret=r-tls")
    for component in ("gateway", "decoder"):
        f = flags(container(docs, component))
        assert mounted_secret(docs, component, f["--redis-ca"]) == "r-tls" and "--redis-cert" not in f
        assert _egress_components(by_kind(docs, "NetworkPolicy")[component])[6379] == {"<other>"}
    assert "--redis-ca" not in flags(container(render("--set", "redis.enabled=false", "--set",
                                                      "externalRedis.existingSecret=r"), "gateway"))


def test_twilio_port_is_served_published_and_admitted_with_its_token_from_a_secret():
    """gateway.twilio (issue 14): the gateway's args name the port (accepted by the real CLI), the
    container and the public Service publish it, the NetworkPolicy admits it beside gRPC, and the
    account's auth token comes from a Secret, never args."""
    import argparse

    from vitaserve.cli import serve

    docs = render("--set", "gateway.twilio.port=8443", "--set", "gateway.twilio.authTokenSecret=twilio",
                  "--set", "gateway.twilio.publicUrl=wss://voice.example.com")
    c = container(docs, "gateway")
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve.subparser_init(parser.add_subparsers(dest="command"))
    args = parser.parse_args(c["args"])
    assert (args.twilio_port, args.twilio_public_url) == (8443, "wss://voice.example.com")
    assert {"name": "twilio", "containerPort": 8443, "protocol": "TCP"} in c["ports"]
    env = {e["name"]: e for e in c["env"]}
    assert env["VITA_TWILIO_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "twilio", "key": "token"}
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("gateway"))
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "twilio": 8443}
    ingress = by_kind(docs, "NetworkPolicy")["gateway"]["spec"]["ingress"]
    assert {p["port"] for rule in ingress for p in rule["ports"]} >= {50051, 8443}
    # off by default: no port, no arg
    plain = container(render(), "gateway")
    assert not [a for a in plain["args"] if a.startswith("--twilio")] and "twilio" not in str(plain["ports"])


def test_realtime_and_audiosocket_ports_their_services_policy_and_the_websocket_ingress():
    """gateway.realtime, gateway.audiosocket and gateway.ingress (issue 14 item 5): the real CLI accepts
    the args; Realtime is a port of the public Service, AudioSocket (no credential on the wire) has a
    Service of its own, is admitted only from networkPolicy.audiosocketFrom and runs with an API key
    from a Secret; the Ingress routes each WebSocket path to its port with timeouts beyond a call."""
    import argparse

    from vitaserve.cli import serve

    pbx = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    docs = render("--set", "gateway.twilio.port=8443", "--set", "gateway.twilio.preset=telnyx",
                  "--set", "gateway.realtime.port=8444", "--set", "gateway.audiosocket.port=9092",
                  "--set", "gateway.audiosocket.apiKeySecret=pbx", "--set-json",
                  f"networkPolicy.audiosocketFrom={json.dumps(pbx)}", "--set", "gateway.ingress.enabled=true",
                  "--set", "gateway.ingress.tlsSecret=voice-tls")
    c = container(docs, "gateway")
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve.subparser_init(parser.add_subparsers(dest="command"))
    args = parser.parse_args(c["args"])
    assert (args.twilio_preset, args.realtime_port, args.audiosocket_port) == ("telnyx", 8444, 9092)
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} >= {("realtime", 8444), ("audiosocket", 9092)}
    env = {e["name"]: e for e in c["env"]}
    assert env["VITA_AUDIOSOCKET_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pbx", "key": "api-key"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    public = next(s for n, s in services.items() if n.endswith("gateway"))
    assert {p["name"] for p in public["spec"]["ports"]} == {"grpc", "twilio", "realtime"}
    pbx_service = next(s for n, s in services.items() if n.endswith("gateway-audiosocket"))
    assert pbx_service["spec"]["type"] == "ClusterIP" and pbx_service["spec"]["ports"][0]["port"] == 9092
    rules = by_kind(docs, "NetworkPolicy")["gateway"]["spec"]["ingress"]
    from_of = {p["port"]: rule.get("from") for rule in rules for p in rule["ports"]}
    assert from_of[9092] == pbx and 8444 in from_of
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    paths = {p["path"]: p["backend"]["service"]["port"]["name"]
             for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert paths == {"/twilio": "twilio", "/v1/realtime": "realtime"}
    assert ingress["spec"]["tls"][0]["secretName"] == "voice-tls"
    timeout = int(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert timeout >= values_of()["maxCallSeconds"]
    # an AudioSocket port without its API key, or an Ingress without a WebSocket port, is refused
    for bad, words in ((["--set", "gateway.audiosocket.port=9092"], "apiKeySecret"),
                       (["--set", "gateway.ingress.enabled=true"], "needs gateway.twilio.port")):
        result = helm("template", "vita", str(CHART), *bad, check=False)
        assert result.returncode != 0 and words in result.stderr
