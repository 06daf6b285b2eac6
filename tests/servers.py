"""Real servers for integration tests: redis-server and tritonserver on free localhost ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from vitaserve.common.local_cluster import free_port


@contextmanager
def redis_server(workdir: Path):
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run scripts/setup.sh")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def triton_server(workdir: Path, lm_dir: Path, num_slots: int = 8, max_len: int = 1024):
    from vitaserve.generator import triton_local

    repo = triton_local.prepare_model_repository(workdir / "model_repo", lm_dir, num_slots=num_slots, max_len=max_len)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log = workdir / "triton.log"
    proc = triton_local.start_tritonserver(repo, grpc_port, http_port, metrics_port, log)
    try:
        try:
            triton_local.wait_ready(proc, http_port, timeout_s=180)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- triton log ---\n{log.read_text()[-4000:]}") from exc
        yield {"grpc": f"127.0.0.1:{grpc_port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
