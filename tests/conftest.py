"""Shared fixtures: tiny checkpoints generated once per test session in the official formats."""

from __future__ import annotations

import subprocess
import wave

import numpy as np
import pytest
import torch

from vitaserve.common.resample import resample

# Tests share 2 cores with the servers they start (Triton, the in-process cluster): one torch thread
# per process avoids OpenMP threads spinning against each other, which slows everything tenfold.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from vitaserve.devcluster.checkpoints import ensure_checkpoints

    return ensure_checkpoints(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0, parts=("lm",)).lm


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    from vitaserve.generator.language_model import LanguageModel

    return LanguageModel.from_folder(tiny_lm_dir, num_slots=4, max_len=512)


# -- the in-process cluster (real Redis, real Triton, real gRPC servers), shared by the suites ---------
@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, tiny_lm_dir):
    """The folder holding lm/, tokenizer/ and decoder/ (the LM of tiny_lm_dir, the codec made once)."""
    from vitaserve.devcluster.checkpoints import ensure_checkpoints

    root = tiny_lm_dir.parent
    ensure_checkpoints(root, "tiny")
    return root


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    from servers import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def triton(tmp_path_factory, tiny_lm_dir):
    """A real tritonserver with the tiny generator: {"grpc": addr, "metrics": url, "log": path}."""
    from servers import triton_server

    with triton_server(tmp_path_factory.mktemp("triton"), tiny_lm_dir) as t:
        yield t


@pytest.fixture(scope="session")
def cluster(ckpt, redis_url, triton):
    from cluster import InProcessCluster

    c = InProcessCluster(ckpt, redis_url, triton["grpc"]).start()
    c.redis_url = redis_url
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def utterance(tmp_path_factory) -> np.ndarray:
    """A real spoken question (espeak-ng), as 8 kHz float samples."""
    path = tmp_path_factory.mktemp("speech") / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What is the weather like today?"], check=True)
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
        rate = w.getframerate()
    return resample(x, rate, 8000)
