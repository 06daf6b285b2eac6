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


# -- a gateway on the secure edge (the Node caller and `vita-audio call` tests) ---------------------
@pytest.fixture(scope="module")
def tls_gateway(cluster, tmp_path_factory):
    """One more gateway of the cluster, started as a pod starts it: TLS on its port (a test CA), API
    keys from the file named by $VITA_API_KEYS_FILE (stored hashed, tenant "acme"), no anonymous
    callers. (address, CA file, the key)."""
    import argparse
    import json
    import secrets

    from tls_certs import TestCA
    from vitaserve.common.settings import REDIS_URL_ENV
    from vitaserve.gateway.auth import API_KEYS_FILE_ENV, hash_key
    from vitaserve.gateway.service import Gateway
    from vitaserve.gateway.settings import GatewaySettings

    directory = tmp_path_factory.mktemp("node-gateway")
    ca = TestCA(directory)
    server = ca.issue("gateway")  # localhost and 127.0.0.1
    key = secrets.token_urlsafe(32)
    keys_file = directory / "api-keys.json"
    keys_file.write_text(json.dumps({"keys": [{"id": "node", "tenant": "acme", "sha256": hash_key(key)}]}))
    parser = argparse.ArgumentParser()
    GatewaySettings.add_arguments(parser)
    args = parser.parse_args([
        "--lm", str(cluster.ckpt / "lm"), "--encoder", f"127.0.0.1:{cluster.encoder.port}",
        "--decoder", cluster.decoder_target, "--triton", cluster.triton_grpc, "--host", "127.0.0.1", "--port", "0",
        "--replica-id", "gw-node", "--max-utterance-s", "8", "--context-tokens", "1024",
        "--tls-cert", str(server.cert), "--tls-key", str(server.key)])
    settings = GatewaySettings.from_args(args, {REDIS_URL_ENV: cluster.redis_url, API_KEYS_FILE_ENV: str(keys_file)})
    gateway = cluster.run(Gateway.start(settings))
    try:
        yield f"localhost:{gateway.port}", ca.file, key
    finally:
        cluster.run(gateway.stop(0))
