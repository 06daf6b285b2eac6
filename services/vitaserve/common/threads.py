"""How many CPU threads torch may use: the container's CPU share, not the host's core count.

torch starts one intra-op thread per core it sees. In a pod limited to 4 CPUs on a 64-core node that
is 64 threads fighting over 4 CPUs' worth of time (throttling, latency spikes), and on one machine
running the whole local cluster every process would take every core. So each service sets its
thread count: explicitly, or from the cgroup CPU quota, else from the cores it may run on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

TORCH_SERVICES = ("encoder", "decoder")  # the services whose processes run torch (threads, allocator)
CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, else v1 cfs quota/period); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_budget(root: Path = CGROUP) -> int:
    """Whole CPUs this process may use: the cgroup quota rounded up, at most the cores it may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def set_torch_threads(threads: int = 0) -> int:
    """torch intra-op threads: `threads`, or cpu_budget() when 0. Returns the number set."""
    import torch

    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = the CPUs this container may use), got {threads}")
    n = threads or cpu_budget()
    torch.set_num_threads(n)
    return n


def add_threads_argument(parser) -> None:
    """--threads of a service that runs torch (encoder, decoder)."""
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = the CPUs this container may use: its cgroup quota, else its "
                             "cores); set it to the pod's CPU request when there is no CPU limit")
