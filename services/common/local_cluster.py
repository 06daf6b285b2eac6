"""The embedded default: every service of the cluster as a local process, started and stopped together.

Redis (temp dir, no persistence), Triton (the nvidia-pytriton binary), then encoder, decoder and
gateway as `python -m vitaserve.cli serve ...` subprocesses, each in its own process group with its
own log file. `start()` waits for each to be ready (gRPC health SERVING, Triton HTTP ready) and, if
one fails, stops everything and raises ClusterError with the tail of that service's log.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ClusterError(RuntimeError):
    pass


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

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def wait_grpc_serving(address: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise ClusterError(f"not SERVING after {timeout_s:.0f} s")


class LocalCluster:
    def __init__(self, lm: Path, tokenizer: Path, decoder: Path, port: int = 50051, mode: str = "boost",
                 workdir: Path | None = None, num_slots: int = 16, max_len: int = 4096,
                 progress: Callable[[str], None] = lambda msg: None):
        self.lm, self.tokenizer, self.decoder = Path(lm), Path(tokenizer), Path(decoder)
        self.port, self.mode, self.num_slots, self.max_len = port, mode, num_slots, max_len
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vita-cluster-"))
        self.progress = progress
        self.services: list[Service] = []

    # ---- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], address: str, metrics: str = "", env: dict | None = None) -> Service:
        log = self.workdir / f"{name}.log"
        out = open(log, "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
        service = Service(name, proc, address, log, metrics)
        self.services.append(service)
        return service

    def _serve(self, service: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "vitaserve.cli", "serve", service, *args]

    def start(self, timeout_s: float = 300.0) -> "LocalCluster":
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self, service: Service, check: Callable[[], None]) -> None:
        self.progress(f"waiting for {service.name} ...")
        start = time.monotonic()
        try:
            check()
        except Exception as exc:
            raise ClusterError(f"{service.name} failed to start: {exc}\n--- {service.log} ---\n{service.log_tail()}") from None
        self.progress(f"{service.name} ready at {service.address} ({time.monotonic() - start:.1f} s)")

    def _start(self, timeout_s: float) -> None:
        from vitaserve.generator import triton_local

        redis_exe = shutil.which("redis-server")
        if redis_exe is None:
            raise ClusterError("redis-server is not installed (run scripts/setup.sh)")
        redis_port = free_port()
        redis = self._spawn("redis", [redis_exe, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)], f"127.0.0.1:{redis_port}")
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self._ready(redis, lambda: _wait_tcp(redis_port, redis.proc, 10))

        repo = triton_local.prepare_model_repository(self.workdir / "model_repo", self.lm, num_slots=self.num_slots,
                                                     max_len=self.max_len)
        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        triton_local.ensure_python_stub()
        log = self.workdir / "triton.log"
        proc = triton_local.start_tritonserver(repo, grpc_port, http_port, metrics_port, log)
        triton = Service("triton", proc, f"127.0.0.1:{grpc_port}", log, f"http://127.0.0.1:{metrics_port}/metrics")
        self.services.append(triton)

        enc_port, dec_port = free_port(), free_port()
        enc_metrics, dec_metrics, gw_metrics = free_port(), free_port(), free_port()
        encoder = self._spawn("encoder", self._serve("encoder", "--tokenizer", str(self.tokenizer), "--port",
                                                     str(enc_port), "--metrics-port", str(enc_metrics)),
                              f"127.0.0.1:{enc_port}", f"http://127.0.0.1:{enc_metrics}/metrics")
        decoder = self._spawn("decoder", self._serve("decoder", "--decoder", str(self.decoder), "--port", str(dec_port),
                                                     "--redis", self.redis_url, "--metrics-port", str(dec_metrics)),
                              f"127.0.0.1:{dec_port}", f"http://127.0.0.1:{dec_metrics}/metrics")
        self._ready(triton, lambda: triton_local.wait_ready(proc, http_port, timeout_s))
        self._ready(encoder, lambda: wait_grpc_serving(encoder.address, encoder.proc, timeout_s))
        self._ready(decoder, lambda: wait_grpc_serving(decoder.address, decoder.proc, timeout_s))
        gateway = self._spawn("gateway", self._serve(
            "gateway", "--lm", str(self.lm), "--port", str(self.port), "--encoder", encoder.address,
            "--decoder", decoder.address, "--triton", triton.address, "--redis", self.redis_url,
            "--metrics-port", str(gw_metrics), "--mode", self.mode),
            f"127.0.0.1:{self.port}", f"http://127.0.0.1:{gw_metrics}/metrics")
        self._ready(gateway, lambda: wait_grpc_serving(gateway.address, gateway.proc, timeout_s))

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process group (gateway first), wait, then SIGKILL what is left."""
        for service in reversed(self.services):
            _signal_group(service.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for service in reversed(self.services):
            try:
                service.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(service.proc, signal.SIGKILL)
                service.proc.wait(5)
        self.services.clear()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def _wait_tcp(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
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
