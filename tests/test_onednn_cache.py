"""The decoder's and encoder's memory levels off because oneDNN's primitive cache is bounded
(common/onednn_cache.py). Proved on oneDNN itself: in a fresh process, set the capacity the way
`vita-audio serve` does (after torch is imported, before the first convolution), run convolutions
of more distinct shapes than the capacity twice, and count the cache misses oneDNN reports
(ONEDNN_VERBOSE): a bounded cache evicts and misses again on the second pass, the default does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitaserve.common.onednn_cache import CAPACITY, ENV, bound_primitive_cache

PROGRAM = """
import sys
import torch
from vitaserve.common.onednn_cache import bound_primitive_cache
if sys.argv[1] != "default":
    bound_primitive_cache(int(sys.argv[1]))
torch.set_num_threads(1)
conv = torch.nn.Conv1d(128, 128, 7, padding=3)  # smaller ones take a non-oneDNN path
with torch.inference_mode():
    for rep in range(2):
        print(f"PASS {rep}", flush=True)
        for length in range(200, 200 + 8 * 16, 16):  # 8 distinct shapes
            conv(torch.randn(1, 128, length))
"""


def second_pass_misses(capacity: str) -> int:
    env = {"ONEDNN_VERBOSE": "all", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROGRAM, capacity], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    assert "PASS 1" in out, out[-2000:]
    first, second = out.split("PASS 1", 1)
    assert "create:cache_miss" in first, "no oneDNN primitive was created: the test would prove nothing"
    return second.count("create:cache_miss")


def test_a_bounded_primitive_cache_evicts_and_the_default_keeps_every_shape():
    assert second_pass_misses("default") == 0
    assert second_pass_misses("2") > 0


def test_the_capacity_is_set_once_and_an_operators_value_wins():
    environ: dict[str, str] = {}
    assert bound_primitive_cache(environ=environ) == CAPACITY and environ[ENV] == str(CAPACITY)
    assert bound_primitive_cache(environ={ENV: "64"}) == 64
    with pytest.raises(ValueError, match="whole number"):
        bound_primitive_cache(environ={ENV: "lots"})
    with pytest.raises(ValueError):
        bound_primitive_cache(-1, environ={})
