"""Local service processes: free ports, readiness waits, process groups, and the error that names a
service that did not come up."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


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


def wait_grpc_serving(address: str, proc: subprocess.Popen, timeout_s: float, tls=None) -> None:
    """Poll grpc.health.v1 until SERVING; fail at once if the process exits. `tls` (common.tls.ClientTls):
    the port serves TLS, and this is who asks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    channel = (grpc.insecure_channel(address) if tls is None
               else grpc.secure_channel(address, tls.credentials(), options=tls.channel_options()))
    with channel:
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


def signal_group(pgid: int, sig: int) -> None:
    # each service leads its own group (start_new_session), so its pid is the group id; Linux keeps
    # that id reserved while any member lives, and an empty group gives ProcessLookupError
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
