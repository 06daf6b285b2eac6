"""CPU threads: the container's quota (cgroup v2 or v1) bounds what each model process uses."""

from __future__ import annotations

import os

import pytest
import torch

from vitaserve.common.threads import cgroup_cpu_quota, cpu_budget, set_torch_threads


def test_cgroup_quota_v2_v1_and_unlimited(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_quota(v2) == 2.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "v1") == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "v1") is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None


def test_budget_rounds_the_quota_up_and_never_exceeds_the_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert cpu_budget(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(cores + 8) * 100000} 100000\n")
    assert cpu_budget(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_budget(tmp_path) == cores


def test_set_torch_threads_explicit_and_refuses_negative():
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be >= 0"):
            set_torch_threads(-2)
    finally:
        torch.set_num_threads(before)


def test_malloc_is_tuned_where_glibc_runs_the_process():
    """Every service tunes glibc malloc at start-up (cli serve): a soak's RSS must level off."""
    import platform

    from vitaserve.common.malloc_tuning import tune_malloc

    if platform.libc_ver()[0] == "glibc":
        assert tune_malloc() is True
    with pytest.raises(ValueError):
        tune_malloc(arenas=0)


def test_jemalloc_is_preloaded_only_where_installed_and_never_over_an_operators_choice():
    import ctypes.util

    from vitaserve.common.malloc_tuning import JEMALLOC, jemalloc_preload

    env = {"PATH": "/usr/bin"}
    got = jemalloc_preload(env)
    assert got == ({**env, "LD_PRELOAD": JEMALLOC} if ctypes.util.find_library("jemalloc") else env)
    assert env == {"PATH": "/usr/bin"}  # a new mapping; the caller's is untouched
    assert jemalloc_preload({"LD_PRELOAD": "libtcmalloc.so"}) == {"LD_PRELOAD": "libtcmalloc.so"}
