"""benchmarks/gpu_check.sh --dry-run: the GPU check's own code (random weights built in memory, the
engine at batch 1 and N, a call joining N-1, the calls-per-GPU sweep, the report against DESIGN.md's
GPU targets) runs end to end on the CPU with tiny shapes, through the same shell entry point the GPU
machine runs, with the package found through PYTHONPATH=services as there. The CUDA-graph capture
and the official side need a GPU and the carried official code: without `.official/` the report
says the official side was skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--official-repo",
                           str(tmp_path / "no_official"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["preset"] == "tiny"
    for key in ("cpu_model", "torch_threads", "torch", "commit"):
        assert key in result, key
    assert result["batch1"]["lone_first_chunk_ms"] > 0 and result["batch1"]["lone_tokens_per_s"] > 0
    assert result["together"]["concurrency"] == 3 and result["together"]["tokens_per_s"] > 0
    assert len(result["joining"]["joining_first_chunk_ms"]) == 1
    assert [row["batch"] for row in result["sweep"]] == [2]
    assert "skipped" in result["official"]
    # the engine's decode steps went through the static path (no graph on the CPU)
    assert result["cuda_graphs"]["static_eager_steps"] > 0 and result["cuda_graphs"]["replays"] == 0
    text = proc.stdout
    for line in ("first chunk, batch 1", "<= 15", "first chunk, a call joining 2", "<= 25", "calls per GPU",
                 "official: no official model code", "Triton on a GPU: not checked"):
        assert line in text, line
