"""The embedded default: every service of the cluster as a local process, started and stopped together.

Redis (temp dir, no persistence), Triton (the nvidia-pytriton binary), then encoder, decoder and
gateway as `python -m vitaserve.cli serve ...` subprocesses, started exactly as a pod starts them
(flags for settings, the Redis URL in $VITA_REDIS_URL, never in argv), each in its own process group
(so a Ctrl-C in the terminal reaches only `vita-audio up`, which stops them in order) with its own
log file. `start()` waits for each to be ready (gRPC health SERVING, Triton HTTP ready) and, if one
fails, stops everything it started and raises ClusterError with the tail of that service's log.

Plaintext by default, each gRPC service told so explicitly (--plaintext), as `vita-audio up` runs.
With `tls=True` every hop is TLS, with certificates generated in the work dir (devcluster/dev_certs.py,
`pki`): the gateway's public port serves TLS (callers trust `pki.ca`), and encoder, decoder, Triton
and Redis require mutual TLS, the gateway and decoder presenting the client certificate.

Processes spawned here also get a parent-death signal (`setpriv --pdeathsig`), so that even a
`kill -9` of the parent leaves no orphans. Linux sends it when the *thread* that spawned the child
ends: start a LocalCluster (and call `restart`/`start_again`) from a thread that outlives it (the
main thread, or a long-lived worker), or pass die_with_parent=False.

Component control, for fault tests and chaos runs (each takes a name from SERVICES; the fault
matrix in devcluster/faults.py and the load test's chaos mode use it):
  kill(name)        SIGKILL its whole process group (Triton's python stubs too) and reap it; the
                    service stays listed, dead, until start_again/restart.
  terminate(name)   SIGTERM (the service drains, as a pod told to stop), SIGKILL after timeout_s.
  pause(name)       SIGSTOP the group: the process holds its sockets and answers nothing (a hang).
  resume(name)      SIGCONT the group.
  start_again(name) spawn it anew on the SAME addresses and ports with the same settings (Redis
                    with the same command and --dir, so it reloads whatever that persists, e.g.
                    its AOF), then wait_ready; it must not be running.
  restart(name)     terminate (graceful=True) or kill, then start_again: a pod restart.
  wait_ready(name)  block until the running instance is ready (gRPC health SERVING, Triton HTTP
                    ready, Redis port open); ClusterError with its log's tail otherwise.
Ports are chosen once per service and kept for its restarts, so clients' channels reconnect to the
new instance by themselves (the window between a kill and start_again in which another program
could take a freed port is a risk only on a busy shared machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vitaserve.common.malloc_tuning import jemalloc_preload
from vitaserve.common.settings import REDIS_URL_ENV
from vitaserve.common.threads import TORCH_SERVICES, cpu_budget
from vitaserve.common.tls import ClientTls, ServerTls
from vitaserve.devcluster.processes import (ClusterError, Service, free_port, signal_group, wait_grpc_serving,
                                            wait_tcp)
from vitaserve.devcluster.redis_local import local_redis_url, redis_command, wait_redis_ready

SERVICES = ("redis", "triton", "encoder", "decoder", "gateway")  # start order
STOP_STAGES = (("gateway",), ("encoder", "decoder", "triton"), ("redis",))  # callers before what they call
# Once the gateway is gone nothing calls the backends, so their drain is instant; a healthy Triton
# unloads in ~3 s. Longer means it hangs (e.g. a model that keeps a request alive): kill it.
BACKEND_STOP_S = 8.0
COMPUTE_SERVICES = 3  # Triton's engine, the encoder and the decoder run torch; the gateway barely does
# the parent's own Redis settings must not reach a child: it gets this cluster's URL, or nothing
INHERITED_SECRETS = (REDIS_URL_ENV, f"{REDIS_URL_ENV}_FILE")


class LocalCluster:
    """Start with `start()` (or `with LocalCluster(...)`), read `services`, stop with `stop()`."""

    def __init__(self, lm: Path, tokenizer: Path, decoder: Path, port: int = 50051, mode: str = "boost",
                 workdir: Path | None = None, num_slots: int = 16, max_len: int = 4096, grace_s: float = 10.0,
                 die_with_parent: bool = True, progress: Callable[[str], None] = lambda msg: None,
                 threads: int = 0, tls: bool = False, adapters: Iterable[str] = (), max_new_tokens: int = 0):
        self.lm, self.tokenizer, self.decoder = Path(lm), Path(tokenizer), Path(decoder)
        self.port, self.mode, self.num_slots, self.max_len = port, mode, num_slots, max_len
        self.grace_s = grace_s  # the services' drain on SIGTERM; stop() waits a little longer
        # telephony adapters the gateway serves, each on its own port (--<name>-port): twilio, realtime, audiosocket
        self.adapters = tuple(adapters)
        if max_new_tokens < 0:
            raise ClusterError(f"max_new_tokens must be >= 0 (0 = the gateway's default), got {max_new_tokens}")
        # the gateway's cap of an answer that asks for none (AudioSocket calls cannot ask); 0: its default
        self.max_new_tokens = max_new_tokens
        # torch threads of each model process: they share this machine, so split its CPUs between
        # them rather than let each take every core (oversubscribed threads cost latency)
        if threads < 0:
            raise ClusterError(f"threads must be >= 0 (0 = split this machine's CPUs), got {threads}")
        self.threads = threads or max(1, cpu_budget() // COMPUTE_SERVICES)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vita-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.pdeathsig = ["setpriv", "--pdeathsig", "TERM", "--"] if die_with_parent and shutil.which("setpriv") else []
        self.services: list[Service] = []  # running, in start order
        self.spawned: list[Service] = []  # every process ever started (kept after stop, for inspection)
        self.ports: dict[str, dict[str, int]] = {}  # name -> role -> port, kept across restarts
        self.paused: set[str] = set()
        self.redis_url = ""
        self.pki = None  # devcluster.dev_certs.DevPki when tls
        if tls:
            from vitaserve.devcluster.dev_certs import make_dev_pki

            self.pki = make_dev_pki(self.workdir / "pki")

    # ---- TLS of the hops (None: plaintext) ----------------------------------------------------------
    def server_tls(self, mutual: bool = True) -> ServerTls | None:
        if self.pki is None:
            return None
        return ServerTls(str(self.pki.server.cert), str(self.pki.server.key), str(self.pki.ca) if mutual else None)

    def client_tls(self) -> ClientTls | None:
        """The identity of a caller of a mutual-TLS hop (the gateway, the decoder, readiness checks)."""
        if self.pki is None:
            return None
        return ClientTls(str(self.pki.ca), str(self.pki.client.cert), str(self.pki.client.key))

    def caller_tls(self) -> ClientTls | None:
        """What a public caller of the gateway needs: trust in the CA, no certificate."""
        return None if self.pki is None else ClientTls(str(self.pki.ca))

    def _tls_args(self, mutual: bool = True) -> list[str]:
        tls = self.server_tls(mutual)
        if tls is None:
            return ["--plaintext"]
        return ["--tls-cert", tls.cert_file, "--tls-key", tls.key_file,
                *(["--tls-client-ca", tls.client_ca_file] if mutual else [])]

    def _client_args(self, prefix: str) -> list[str]:
        tls = self.client_tls()
        if tls is None:
            return []
        return [f"--{prefix}-ca", tls.ca_file, f"--{prefix}-cert", tls.cert_file, f"--{prefix}-key", tls.key_file]

    def service(self, name: str) -> Service:
        try:
            return next(s for s in self.services if s.name == name)
        except StopIteration:
            raise ValueError(f"{name} is not part of this cluster (started: "
                             f"{', '.join(s.name for s in self.services) or 'none'})") from None

    def _ports(self, name: str, *roles: str, **fixed: int) -> dict[str, int]:
        """This service's ports: chosen on its first start (`fixed` ones as given, 0 = free), then kept."""
        ports = self.ports.setdefault(name, {})
        for role in roles:
            if role not in ports:
                ports[role] = fixed.get(role) or free_port()
        return ports

    # ---- start -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 300.0, services: Iterable[str] = SERVICES) -> "LocalCluster":
        """Start `services` (all by default; a subset such as redis+decoder for tests), each ready."""
        names = set(services)
        if names - set(SERVICES):
            raise ValueError(f"unknown services {sorted(names - set(SERVICES))}; known: {', '.join(SERVICES)}")
        needs = {"decoder": {"redis"}, "gateway": set(SERVICES) - {"gateway"}}
        for name in names:
            if not needs.get(name, set()) <= names:
                raise ValueError(f"{name} needs {', '.join(sorted(needs[name]))} started too")
        try:
            if "redis" in names:
                self._wait(self._spawn_named("redis"), 10)
            # Triton, encoder and decoder load their models at the same time, then each is awaited
            started = [self._spawn_named(n) for n in ("triton", "encoder", "decoder") if n in names]
            for service in started:
                self._wait(service, timeout_s)
            if "gateway" in names:
                self._wait(self._spawn_named("gateway"), timeout_s)
        except BaseException:  # a failure or Ctrl-C half-way: nothing may be left running
            self.stop()
            raise
        return self

    def _spawn_named(self, name: str) -> Service:
        try:
            return getattr(self, f"spawn_{name}")()
        except ClusterError:
            raise
        except Exception as exc:  # a missing binary, an unwritable work dir, a bad model_repo template
            raise ClusterError(f"{name} could not be started: {exc}") from exc

    def _wait(self, service: Service, timeout_s: float) -> None:
        self.progress(f"waiting for {service.name} ...")
        start = time.monotonic()
        try:
            service.ready(timeout_s)
        except Exception as exc:
            raise ClusterError(f"{service.name} failed to start: {exc}\n--- last lines of {service.log} ---\n"
                               f"{service.log_tail()}") from None
        self.progress(f"{service.name} ready at {service.address} ({time.monotonic() - start:.1f} s)")

    def _spawn(self, name: str, cmd: list[str], address: str, metrics: str = "",
               secrets: dict[str, str] | None = None) -> Service:
        """Start `cmd`; `secrets` go into its environment (as a pod's come from a Secret), never argv."""
        env = {k: v for k, v in os.environ.items() if k not in INHERITED_SECRETS}
        env.update(OMP_WAIT_POLICY="PASSIVE", **(secrets or {}))
        if name in TORCH_SERVICES:
            env = jemalloc_preload(env)  # their memory levels off (common/malloc_tuning.py)
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([*self.pdeathsig, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        return self._track(Service(name, proc, address, log, metrics))

    def _track(self, service: Service) -> Service:
        """Record a new process; a restarted service takes its predecessor's place in `services`."""
        old = [i for i, s in enumerate(self.services) if s.name == service.name]
        if old:
            self.services[old[0]] = service
        else:
            self.services.append(service)
        self.spawned.append(service)
        return service

    def _serve(self, service: str, port: int, metrics_port: int, *args: str) -> list[str]:
        return [sys.executable, "-m", "vitaserve.cli", "serve", service, "--port", str(port),
                "--metrics-port", str(metrics_port), "--grace-s", str(self.grace_s), *args]

    def spawn_redis(self) -> Service:
        port = self._ports("redis", "tcp")["tcp"]
        redis = self._spawn("redis", redis_command(port, self.workdir, tls=self.server_tls()), f"127.0.0.1:{port}")
        if self.pki is None:
            redis.ready = lambda timeout_s: wait_tcp(port, redis.proc, timeout_s)
        else:
            redis.ready = lambda timeout_s: wait_redis_ready(port, redis.proc, timeout_s, self.client_tls())
        self.redis_url = local_redis_url(port, tls=self.pki is not None)
        return redis

    def spawn_triton(self) -> Service:
        from vitaserve.devcluster import triton_local

        repo = triton_local.prepare_model_repository(self.workdir / "model_repo", self.lm, num_slots=self.num_slots,
                                                     max_len=self.max_len, threads=self.threads)
        ports = self._ports("triton", "grpc", "http", "metrics")
        grpc_port, http_port, metrics_port = ports["grpc"], ports["http"], ports["metrics"]
        log = self.workdir / "triton.log"
        proc = triton_local.start_tritonserver(repo, grpc_port, http_port, metrics_port, log,  # own session
                                               prefix=self.pdeathsig, tls=self.server_tls())
        triton = self._track(Service("triton", proc, f"127.0.0.1:{grpc_port}", log,
                                     f"http://127.0.0.1:{metrics_port}/metrics"))
        triton.ready = lambda timeout_s: triton_local.wait_ready(proc, http_port, timeout_s)
        return triton

    def _spawn_grpc(self, name: str, *args: str, port: int = 0, secrets: dict[str, str] | None = None) -> Service:
        ports = self._ports(name, "grpc", "metrics", grpc=port)
        port, metrics_port = ports["grpc"], ports["metrics"]
        service = self._spawn(name, self._serve(name, port, metrics_port, *args), f"127.0.0.1:{port}",
                              f"http://127.0.0.1:{metrics_port}/metrics", secrets)
        probe = self.client_tls()  # a mutual-TLS port asks for a client certificate; the gateway's ignores it
        service.ready = lambda timeout_s: wait_grpc_serving(service.address, service.proc, timeout_s, probe)
        return service

    def spawn_encoder(self) -> Service:
        return self._spawn_grpc("encoder", "--tokenizer", str(self.tokenizer), "--threads", str(self.threads),
                                *self._tls_args())

    def spawn_decoder(self) -> Service:
        return self._spawn_grpc("decoder", "--decoder", str(self.decoder), "--threads", str(self.threads),
                                *self._tls_args(), *self._client_args("redis"), secrets={REDIS_URL_ENV: self.redis_url})

    def adapter_port(self, name: str) -> int:
        """The gateway's port for telephony adapter `name` (one of `adapters`)."""
        if name not in self.adapters:
            raise ValueError(f"the gateway of this cluster serves no {name} adapter (adapters: {self.adapters})")
        return self._ports("gateway", name)[name]

    def gateway_options(self) -> list[str]:
        """The gateway's flags that are this cluster's choices, not its backends' addresses: adapters,
        answer cap, mode, context, anonymous callers (local: no API keys)."""
        adapter_args = [arg for name in self.adapters for arg in (f"--{name}-port", str(self.adapter_port(name)))]
        cap_args = ["--max-new-tokens", str(self.max_new_tokens)] if self.max_new_tokens else []
        return [*adapter_args, *cap_args, "--mode", self.mode, "--context-tokens", str(self.max_len),
                "--allow-anonymous"]

    def spawn_gateway(self) -> Service:
        return self._spawn_grpc(
            "gateway", *self.gateway_options(), "--lm", str(self.lm), "--encoder", self.service("encoder").address,
            "--decoder", self.service("decoder").address, "--triton", self.service("triton").address,
            *self._tls_args(mutual=False), *self._client_args("internal"), *self._client_args("redis"),
            port=self.port, secrets={REDIS_URL_ENV: self.redis_url})

    # ---- component control (fault injection) ---------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL the service's whole process group and reap it (a crash, an OOM kill)."""
        service = self.service(name)
        signal_group(service.proc.pid, signal.SIGKILL)
        service.proc.wait(10)
        self.paused.discard(name)

    def terminate(self, name: str, timeout_s: float | None = None) -> None:
        """SIGTERM the service (it drains, as a pod told to stop); SIGKILL its group after timeout_s
        (default: its grace + 5 s), and sweep the group for stragglers."""
        service = self.service(name)
        timeout_s = self.grace_s + 5 if timeout_s is None else timeout_s
        signal_group(service.proc.pid, signal.SIGCONT)  # a paused process could not act on SIGTERM
        self.paused.discard(name)
        if service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
        try:
            service.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.progress(f"{name} did not stop within {timeout_s:.0f} s: killed")
        self.kill(name)

    def pause(self, name: str) -> None:
        """SIGSTOP the service's process group: it keeps its sockets open and answers nothing."""
        signal_group(self.service(name).proc.pid, signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        signal_group(self.service(name).proc.pid, signal.SIGCONT)
        self.paused.discard(name)

    def start_again(self, name: str, timeout_s: float = 300.0) -> Service:
        """Spawn a stopped service anew on the same ports and settings, and wait until it is ready."""
        if self.service(name).proc.poll() is None:
            raise ClusterError(f"{name} is still running: kill or terminate it first")
        service = self._spawn_named(name)
        self.wait_ready(name, timeout_s)
        return service

    def restart(self, name: str, graceful: bool = True, timeout_s: float = 300.0) -> Service:
        """A pod restart: terminate (graceful) or kill the service, then start_again."""
        if graceful:
            self.terminate(name)
        else:
            self.kill(name)
        return self.start_again(name, timeout_s)

    def wait_ready(self, name: str, timeout_s: float = 300.0) -> None:
        self._wait(self.service(name), timeout_s)

    # ---- stop --------------------------------------------------------------------------------
    def stop(self, timeout_s: float | None = None) -> None:
        """Stop in stages (gateway, then what it calls, then Redis): SIGTERM each service, wait up to
        timeout_s for the gateway (default: its grace + 5 s; calls may be draining) and BACKEND_STOP_S
        for the rest, SIGKILL the process group of any still running, then sweep every group so that
        no child of a service (Triton's python stubs) outlives it. Idempotent."""
        timeout_s = self.grace_s + 5 if timeout_s is None else timeout_s
        for stage in STOP_STAGES:
            group = [s for s in self.services if s.name in stage]
            for service in group:  # the leader only: Triton must stop its python stubs itself
                signal_group(service.proc.pid, signal.SIGCONT)  # a paused one could not act on SIGTERM
                if service.proc.poll() is None:
                    service.proc.send_signal(signal.SIGTERM)
            limit = timeout_s if stage == STOP_STAGES[0] else min(timeout_s, BACKEND_STOP_S)
            deadline = time.monotonic() + limit
            for service in group:
                try:
                    service.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.progress(f"{service.name} did not stop within {limit:.0f} s: killed")
                    signal_group(service.proc.pid, signal.SIGKILL)
                    service.proc.wait(5)
                signal_group(service.proc.pid, signal.SIGKILL)  # stragglers left in the group
        self.services.clear()
        self.paused.clear()

    def dead(self) -> list[Service]:
        """Services whose process has exited (while the cluster should be running)."""
        return [s for s in self.services if s.proc.poll() is not None]

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
