"""A throwaway redis-server on a free localhost port: no persistence, files in a work folder."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vitaserve.devcluster.processes import ClusterError, free_port, wait_tcp


def redis_command(port: int, workdir: Path) -> list[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ClusterError("redis-server is not installed (run scripts/setup.sh, or apt-get install redis-server)")
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]


def local_redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


@contextmanager
def redis_server(workdir: Path, timeout_s: float = 10.0) -> Iterator[str]:
    """A redis-server for the length of the block; yields its URL (the tests' session store)."""
    port = free_port()
    proc = subprocess.Popen(redis_command(port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_tcp(port, proc, timeout_s)
        yield local_redis_url(port)
    finally:
        proc.terminate()
        proc.wait(10)
