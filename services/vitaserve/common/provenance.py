"""Which code, on which machine, produced a benchmark figure: written beside every figure, because a
ratio is only a result when both sides ran on the same machine in the same run (DESIGN.md)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """Short HEAD commit of the checkout holding this package, "+dirty" when its tracked files have
    changes not committed (a figure then belongs to no commit); None outside a git checkout."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=5).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if changed else "")) or None


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"): /proc/cpuinfo on Linux, where platform.processor()
    is often empty; the architecture elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str = "cpu") -> dict:
    """CPU model, cores, torch threads, torch version, git commit and, on cuda, the GPU's name."""
    import torch

    out = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
           "device": device}
    if str(device).startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out
