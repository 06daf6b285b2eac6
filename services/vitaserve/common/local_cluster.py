"""The embedded default: every service of the cluster as a local process, started and stopped together.

Redis (temp dir, no persistence), Triton (the nvidia-pytriton binary), then encoder, decoder and
gateway as `python -m vitaserve.cli serve ...` subprocesses, each in its own process group (so a
Ctrl-C in the terminal reaches only `vita-audio up`, which stops them in order) with its own log file.
`start()` waits for each to be ready (gRPC health SERVING, Triton HTTP ready) and, if one fails, stops
everything it started and raises ClusterError with the tail of that service's log.

Processes spawned here also get a parent-death signal (`setpriv --pdeathsig`), so that even a
`kill -9` of the parent leaves no orphans. Linux sends it when the *thread* that spawned the child
ends: start a LocalCluster from a thread that outlives it (the main thread), or pass
die_with_parent=False.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve.common.threads import cpu_budget

SERVICES = ("redis", "triton", "encoder", "decoder", "gateway")  # start order
STOP_STAGES = (("gateway",), ("encoder", "decoder", "triton"), ("redis",))  # callers before what they call
# Once the gateway is gone nothing calls the backends, so their drain is instant; a healthy Triton
# unloads in ~3 s. Longer means it hangs (e.g. a model that keeps a request alive): kill it.
BACKEND_STOP_S = 8.0
COMPUTE_SERVICES = 3  # Triton's engine, the encoder and the decoder run torch; the gateway barely does


class ClusterError(RuntimeError):
    """A service did not come up; the message names it and carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    address: str
    log: Path
    metrics: str = ""
    ready: Callable[[float], None] = field(default=lambda timeout_s: None, repr=False)  # raises if not ready

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def wait_grpc_serving(address: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll grpc.health.v1 until SERVING; fail at once if the process exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"exited with code {proc.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise ClusterError(f"not SERVING after {timeout_s:.0f} s")


def wait_tcp(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ClusterError(f"port {port} not open after {timeout_s:.0f} s")


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


class LocalCluster:
    """Start with `start()` (or `with LocalCluster(...)`), read `services`, stop with `stop()`."""

    def __init__(self, lm: Path, tokenizer: Path, decoder: Path, port: int = 50051, mode: str = "boost",
                 workdir: Path | None = None, num_slots: int = 16, max_len: int = 4096, grace_s: float = 10.0,
                 die_with_parent: bool = True, progress: Callable[[str], None] = lambda msg: None,
                 threads: int = 0):
        self.lm, self.tokenizer, self.decoder = Path(lm), Path(tokenizer), Path(decoder)
        self.port, self.mode, self.num_slots, self.max_len = port, mode, num_slots, max_len
        self.grace_s = grace_s  # the services' drain on SIGTERM; stop() waits a little longer
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
        self.redis_url = ""

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

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

    def _spawn(self, name: str, cmd: list[str], address: str, metrics: str = "") -> Service:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([*self.pdeathsig, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        return self._track(Service(name, proc, address, log, metrics))

    def _track(self, service: Service) -> Service:
        self.services.append(service)
        self.spawned.append(service)
        return service

    def _serve(self, service: str, port: int, metrics_port: int, *args: str) -> list[str]:
        return [sys.executable, "-m", "vitaserve.cli", "serve", service, "--port", str(port),
                "--metrics-port", str(metrics_port), "--grace-s", str(self.grace_s), *args]

    def spawn_redis(self) -> Service:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ClusterError("redis-server is not installed (run scripts/setup.sh, or apt-get install redis-server)")
        port = free_port()
        redis = self._spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)], f"127.0.0.1:{port}")
        redis.ready = lambda timeout_s: wait_tcp(port, redis.proc, timeout_s)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        return redis

    def spawn_triton(self) -> Service:
        from vitaserve.generator import triton_local

        repo = triton_local.prepare_model_repository(self.workdir / "model_repo", self.lm, num_slots=self.num_slots,
                                                     max_len=self.max_len, threads=self.threads)
        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        log = self.workdir / "triton.log"
        proc = triton_local.start_tritonserver(repo, grpc_port, http_port, metrics_port, log)  # own session
        triton = self._track(Service("triton", proc, f"127.0.0.1:{grpc_port}", log,
                                     f"http://127.0.0.1:{metrics_port}/metrics"))
        triton.ready = lambda timeout_s: triton_local.wait_ready(proc, http_port, timeout_s)
        return triton

    def _spawn_grpc(self, name: str, *args: str) -> Service:
        port, metrics_port = free_port(), free_port()
        service = self._spawn(name, self._serve(name, port, metrics_port, *args), f"127.0.0.1:{port}",
                              f"http://127.0.0.1:{metrics_port}/metrics")
        service.ready = lambda timeout_s: wait_grpc_serving(service.address, service.proc, timeout_s)
        return service

    def spawn_encoder(self) -> Service:
        return self._spawn_grpc("encoder", "--tokenizer", str(self.tokenizer), "--threads", str(self.threads))

    def spawn_decoder(self) -> Service:
        return self._spawn_grpc("decoder", "--decoder", str(self.decoder), "--redis", self.redis_url,
                                "--threads", str(self.threads))

    def spawn_gateway(self) -> Service:
        metrics_port = free_port()
        gateway = self._spawn("gateway", self._serve(
            "gateway", self.port, metrics_port, "--lm", str(self.lm), "--encoder", self.service("encoder").address,
            "--decoder", self.service("decoder").address, "--triton", self.service("triton").address,
            "--redis", self.redis_url, "--mode", self.mode, "--context-tokens", str(self.max_len)),
            f"127.0.0.1:{self.port}", f"http://127.0.0.1:{metrics_port}/metrics")
        gateway.ready = lambda timeout_s: wait_grpc_serving(gateway.address, gateway.proc, timeout_s)
        return gateway

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
                if service.proc.poll() is None:
                    service.proc.send_signal(signal.SIGTERM)
            limit = timeout_s if stage == STOP_STAGES[0] else min(timeout_s, BACKEND_STOP_S)
            deadline = time.monotonic() + limit
            for service in group:
                try:
                    service.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.progress(f"{service.name} did not stop within {limit:.0f} s: killed")
                    _signal_group(service.proc.pid, signal.SIGKILL)
                    service.proc.wait(5)
                _signal_group(service.proc.pid, signal.SIGKILL)  # stragglers left in the group
        self.services.clear()

    def dead(self) -> list[Service]:
        """Services whose process has exited (while the cluster should be running)."""
        return [s for s in self.services if s.proc.poll() is not None]

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    # each service leads its own group (start_new_session), so its pid is the group id; Linux keeps
    # that id reserved while any member lives, and an empty group gives ProcessLookupError
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
