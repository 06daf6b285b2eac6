"""Real servers for integration tests: the development cluster's redis-server (persisting as the
product's: AOF, maxmemory, noeviction; LocalRedis can be killed and restarted from its AOF) and
tritonserver, on free localhost ports, sized for the tests."""

from __future__ import annotations

from pathlib import Path

from vitaserve.devcluster.processes import free_port
from vitaserve.devcluster.redis_local import LocalRedis, redis_server
from vitaserve.devcluster.triton_local import triton_server as _triton_server

__all__ = ["LocalRedis", "free_port", "redis_server", "triton_server"]


def triton_server(workdir: Path, lm_dir: Path, num_slots: int = 8, max_len: int = 1024, tls=None):
    """A ready tritonserver (context manager): {"grpc": address, "metrics": url, "log": path};
    `tls` (common.tls.ServerTls): its gRPC port serves (mutual) TLS."""
    return _triton_server(workdir, lm_dir, num_slots=num_slots, max_len=max_len, timeout_s=180, tls=tls)
