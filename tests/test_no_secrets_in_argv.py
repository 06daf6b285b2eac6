"""`ps` shows no secret (issue 13 item 6): render the chart with every secret configured, start the
real redis-server, encoder, decoder and gateway with each container's rendered args (Secrets
materialised as the files Kubernetes would mount, secretKeyRef env from those Secrets), check that
they came up on those args (TLS, mTLS, rediss:// with the ACL user), then assert that no secret value
appears in /proc/*/cmdline of any process they started, nor in their logs.

The pod paths are moved under a temporary root and the ports to free loopback ports; nothing else of
the args changes. Triton is not started (its args hold file paths only; they are checked as text)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import redis.exceptions
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from test_helm_chart import HELM, by_kind, render
from tls_certs import TestCA
from vitaserve.common.session_store import connect_redis
from vitaserve.common.tls import ClientTls
from vitaserve.devcluster.processes import ClusterError, free_port, wait_grpc_serving, wait_tcp
from vitaserve.gateway.auth import hash_key

PORT_ATTEMPTS = 3  # a service whose picked port was taken before it bound it starts again on new ones

pytestmark = pytest.mark.skipif(HELM is None, reason="helm is not installed (scripts/install_helm.sh)")

TLS_IDENTITIES = ("public", "gateway", "encoder", "decoder", "triton", "redis")
VALUES = ("--set", "tls.source=existingSecrets",
          *[x for i in TLS_IDENTITIES for x in ("--set", f"tls.existingSecrets.{i}={i}-tls")],
          "--set", "tls.clientCaSecret=callers-ca", "--set", "auth.apiKeys.existingSecret=api-keys",
          "--set", "auth.jwt.jwksSecret=jwks", "--set", "auth.jwt.issuer=https://idp.example",
          "--set", "auth.jwt.audience=vita-audio", "--set", "auth.quota.maxCalls=5",
          "--set", "redis.persistence.enabled=false")
MOUNT_ROOTS = ("/etc/vita", "/etc/redis", "/checkpoints", "/data")


def secret_files(docs: list[dict], root: Path) -> tuple[dict[str, dict[str, bytes]], list[bytes]]:
    """Every Secret the pods mount or read, as {name: {key: bytes}}, and the secret values among them."""
    ca = TestCA(root / "pki")
    files: dict[str, dict[str, bytes]] = {}
    for identity in TLS_IDENTITIES:
        leaf = ca.issue(identity)  # localhost and 127.0.0.1: the services are dialled on loopback
        files[f"{identity}-tls"] = {"tls.crt": leaf.cert.read_bytes(), "tls.key": leaf.key.read_bytes(),
                                    "ca.crt": ca.file.read_bytes()}
    files["callers-ca"] = {"ca.crt": TestCA(root / "callers", "callers-ca").file.read_bytes()}
    api_key = secrets.token_urlsafe(32)
    files["api-keys"] = {"api-keys.json": json.dumps(
        {"keys": [{"id": "k1", "tenant": "acme", "sha256": hash_key(api_key)}]}).encode()}
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    files["jwks"] = {"jwks.json": json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]}).encode()}
    (redis,) = [d for d in docs if d["kind"] == "Secret"]
    files[redis["metadata"]["name"]] = {k: base64.b64decode(v) for k, v in redis["data"].items()}
    password = files[redis["metadata"]["name"]]["redis-password"]
    values = [password, api_key.encode(), hash_key(api_key).encode()]
    values += [pem_body(files[f"{i}-tls"]["tls.key"]) for i in TLS_IDENTITIES]
    return files, values


def pem_body(pem: bytes) -> bytes:
    """The longest base64 line of a PEM private key: what a leaked key would show."""
    return max(pem.splitlines()[1:-1], key=len)


class Pod:
    """One container of the rendered chart, run as a local process under `root`."""

    def __init__(self, docs: list[dict], component: str, root: Path, files: dict, ports: dict[str, int]):
        kind = "StatefulSet" if component == "redis" else "Deployment"
        spec = by_kind(docs, kind)[component]["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        self.component, self.root, self.ports = component, root, ports
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in self.container.get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret")
            if secret:
                data = files[secret["secretName"]]
                items = secret.get("items") or [{"key": k, "path": k} for k in data]
                folder = self.path(mount["mountPath"])
                folder.mkdir(parents=True, exist_ok=True)
                for item in items:
                    (folder / item["path"]).write_bytes(data[item["key"]])
        self.env = {}
        for env in self.container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            self.env[env["name"]] = (files[ref["name"]][ref["key"]].decode() if ref
                                     else str(self.path(env["value"])) if env["value"].startswith(MOUNT_ROOTS)
                                     else env["value"])

    def path(self, pod_path: str) -> Path:
        return self.root / self.component / pod_path.lstrip("/")

    def local(self, arg: str) -> str:
        """An arg with pod paths moved under the root and pod ports/hosts made loopback ones."""
        flag, eq, value = arg.partition("=")
        if eq and flag in ("--port", "--metrics-port", "--health-port"):
            return f"{flag}={self.ports[flag]}"
        if eq and self.component == "gateway" and flag in ("--encoder", "--decoder", "--triton"):
            return f"{flag}=127.0.0.1:{self.ports[flag]}"
        if eq and flag == "--threads":
            return f"{flag}=1"  # the tests' 2 shared cores
        if eq and value.startswith(MOUNT_ROOTS):
            return f"{flag}={self.path(value)}"
        if arg.startswith(MOUNT_ROOTS):
            return str(self.path(arg))
        return arg

    def start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log = self.root / f"{self.component}.log"
        with open(self.log, "wb") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **env}, start_new_session=True)


async def redis_answers(url: str, tls: ClientTls) -> tuple[bool, str]:
    """(PING answered, the error CONFIG GET gets) as the services' client sees them."""
    client = connect_redis(url, tls=tls)
    try:
        try:
            await client.config_get("maxmemory")
            refused = ""
        except redis.exceptions.NoPermissionError:  # Redis's NOPERM
            refused = "NOPERM"
        return await client.ping(), refused
    finally:
        await client.aclose()


def descendants(pid: int) -> list[int]:
    """The process and every process in its session (a service's children: Triton stubs, torch workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_no_secret_in_argv_or_logs_of_the_rendered_services(ckpt, tmp_path):
    docs = render(*VALUES)
    files, values = secret_files(docs, tmp_path)
    redis_port = free_port()
    procs: list[tuple[Pod, subprocess.Popen]] = []
    try:
        # redis-server exactly as the StatefulSet runs it: config file from the Secret, TLS, ACL user
        redis = Pod(docs, "redis", tmp_path, files, {})
        args = [redis.local(a) for a in redis.container["args"]]
        args[args.index("--tls-port") + 1] = str(redis_port)
        args[args.index("--dir") + 1] = str(redis.path("/data"))
        redis.path("/data").mkdir(parents=True)
        proc = redis.start(["redis-server", *args], {})
        procs.append((redis, proc))
        wait_tcp(redis_port, proc, 10)
        url_host = "vita-vita-audio-redis.voice.svc.cluster.local:6379"
        ports: dict[str, dict[str, int]] = {}
        for name in ("encoder", "decoder", "gateway"):
            for attempt in range(PORT_ATTEMPTS):
                ports[name] = {"--port": free_port(), "--metrics-port": free_port(), "--health-port": free_port()}
                pod = Pod(docs, name, tmp_path, files, {**ports[name], "--encoder": ports["encoder"]["--port"],
                                                        "--decoder": ports.get("decoder", ports[name])["--port"],
                                                        "--triton": free_port()})
                pod.env = {k: v.replace(url_host, f"127.0.0.1:{redis_port}") for k, v in pod.env.items()}
                # the pods' checkpoints are the tiny ones of the tests
                args = [pod.local(a).replace(str(pod.path("/checkpoints")), str(ckpt)) for a in pod.container["args"]]
                proc = pod.start([sys.executable, "-m", "vitaserve.cli", *args], pod.env)
                try:
                    # health over the plaintext probe port, and the service port itself only over mutual TLS
                    wait_grpc_serving(f"127.0.0.1:{ports[name]['--health-port']}", proc, 240)
                except ClusterError:
                    # a port free when picked can be taken before the service binds it (any process's
                    # outgoing connection may get it): pick again; any other failure is the test's
                    if "Address already in use" not in pod.log.read_text() or attempt == PORT_ATTEMPTS - 1:
                        raise AssertionError(f"{name} exited: {pod.log.read_text()[-2000:]}") from None
                    continue
                procs.append((pod, proc))
                break
        client = files["decoder-tls"]  # any certificate of the internal CA
        pki = tmp_path / "client"
        pki.mkdir()
        for key, data in client.items():
            (pki / key).write_bytes(data)
        internal = ClientTls(str(pki / "ca.crt"), str(pki / "tls.crt"), str(pki / "tls.key"))
        wait_grpc_serving(f"localhost:{ports['encoder']['--port']}", procs[1][1], 30, tls=internal)
        # the URL the services read (rediss://, the chart's ACL user) opens the chart's Redis, and the
        # ACL user may not run administrative commands
        url = procs[-1][0].env["VITA_REDIS_URL"]
        assert url.startswith(f"rediss://vita:{files['vita-vita-audio-redis']['redis-password'].decode()}@127.0.0.1:")
        assert asyncio.run(redis_answers(url, internal)) == (True, "NOPERM")

        cmdlines = {}
        for pod, proc in procs:
            assert proc.poll() is None, f"{pod.component} exited: {pod.log.read_text()[-2000:]}"
            for pid in descendants(proc.pid):
                try:
                    cmdlines[pid] = (pod.component, Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    pass
        assert {c for c, _ in cmdlines.values()} == {"redis", "encoder", "decoder", "gateway"}
        for pid, (component, cmdline) in cmdlines.items():
            for value in values:
                assert value not in cmdline, f"{component} (pid {pid}) has a secret in its argv"
        # the rendered Triton args: file paths and flags only
        triton = by_kind(docs, "Deployment")["triton"]["spec"]["template"]["spec"]["containers"][0]
        assert not [v for v in values if v.decode() in yaml.safe_dump(triton)]
    finally:
        for pod, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for pod, proc in reversed(procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    for pod, _ in procs:
        log = pod.log.read_bytes()
        for value in values:
            assert value not in log, f"{pod.component}'s log holds a secret"
