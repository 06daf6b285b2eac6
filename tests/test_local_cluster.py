"""The local cluster as real processes: start, health, clean stop (no process left), failure half-way,
`vita-audio up` (one call end to end; SIGTERM during start-up), and `vita-audio call` argument errors."""

from __future__ import annotations

import ctypes.util
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers import free_port
from vitaserve.devcluster.cluster import LocalCluster
from vitaserve.devcluster.processes import ClusterError, group_pids
from vitaserve.common.wav import write_wav


def vita(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "vitaserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


@pytest.fixture
def question(tmp_path) -> Path:
    """A short stereo 16 kHz WAV (the caller's side converts it to mono 8 kHz)."""
    path = tmp_path / "q.wav"
    t = np.arange(16000 // 2) / 16000
    write_wav(path, np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)]), 16000)
    return path


def test_encoder_and_decoder_processes_serve_then_stop_cleanly(ckpt, tmp_path):
    import redis

    cluster = LocalCluster(ckpt / "lm", ckpt / "tokenizer", ckpt / "decoder", workdir=tmp_path, grace_s=2)
    try:
        cluster.start(120, services=("decoder", "encoder", "redis"))  # any order: started in dependency order
        assert [s.name for s in cluster.services] == ["redis", "encoder", "decoder"]
        assert redis.Redis.from_url(cluster.redis_url).ping()
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health(cluster.service("encoder").address, "vita.audio.v1.Encoder") == serving
        assert health(cluster.service("decoder").address, "vita.audio.v1.Decoder") == serving
        with urllib.request.urlopen(cluster.service("decoder").metrics, timeout=5) as resp:
            assert b"# TYPE" in resp.read()
        pids = {pid for s in cluster.services for pid in group_pids(s.proc.pid)}
        assert {s.proc.pid for s in cluster.services} <= pids
        assert not [s.name for s in cluster.services if "redis://" in " ".join(s.proc.args)]  # env, not argv
        if ctypes.util.find_library("jemalloc"):  # torch services run on jemalloc where it is installed
            for name in ("encoder", "decoder"):
                maps = Path(f"/proc/{cluster.service(name).proc.pid}/maps").read_text()
                assert "libjemalloc" in maps, name
    finally:
        cluster.stop()
    assert cluster.services == []
    assert not [pid for pid in pids if alive(pid)]
    # SIGTERM, not SIGKILL: every service drained and exited by itself
    assert [s.proc.returncode for s in cluster.spawned] == [0, 0, 0]
    first = json.loads((tmp_path / "encoder.log").read_text().splitlines()[0])  # structlog JSON lines
    assert first["service"] == "encoder"


def test_a_service_failing_half_way_stops_the_rest_and_shows_its_log(ckpt, tmp_path):
    cluster = LocalCluster(ckpt / "lm", ckpt / "tokenizer", tmp_path / "no-decoder", workdir=tmp_path, grace_s=2)
    with pytest.raises(ClusterError) as err:
        cluster.start(120, services=("redis", "encoder", "decoder"))
    message = str(err.value)
    assert message.startswith("decoder failed to start: exited with code 2")
    assert "no-decoder: no config.yaml" in message  # the tail of decoder.log
    assert [s.name for s in cluster.spawned] == ["redis", "encoder", "decoder"] and cluster.services == []
    assert not [s.name for s in cluster.spawned if s.proc.returncode is None or alive(s.proc.pid)]


def test_start_rejects_a_gateway_without_its_backends(ckpt, tmp_path):
    cluster = LocalCluster(ckpt / "lm", ckpt / "tokenizer", ckpt / "decoder", workdir=tmp_path)
    with pytest.raises(ValueError, match="gateway needs"):
        cluster.start(services=("redis", "gateway"))
    with pytest.raises(ValueError, match="unknown services"):
        cluster.start(services=("postgres",))
    assert cluster.spawned == []


def test_up_with_a_call_writes_the_answer_and_stops_everything(tmp_path, ckpt):
    question = tmp_path / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(question), "Hello, what time is it?"], check=True)
    answer, logs = tmp_path / "answer.wav", tmp_path / "logs"
    port = free_port()
    done = vita("up", "--lm", str(ckpt / "lm"), "--tokenizer", str(ckpt / "tokenizer"),
                "--decoder", str(ckpt / "decoder"), "--port", str(port), "--num-slots", "4", "--max-len", "1024",
                "--logs", str(logs), "--call", str(question), "--out", str(answer), "--max-new-tokens", "60")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gateway ready" in done.stdout and "first audio:" in done.stdout and "stopped" in done.stdout
    table = done.stdout[done.stdout.index("service "):done.stdout.index("gateway ready:")]
    for name in ("redis", "triton", "encoder", "decoder", "gateway"):
        assert name in table and (logs / f"{name}.log").exists()
    assert f"127.0.0.1:{port}" in table
    with wave.open(str(answer)) as w:
        assert w.getframerate() == 8000 and w.getnframes() > 8000 * 0.3
    leftover = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert not leftover  # the gateway (and the rest, stopped before it) are gone


def test_up_stopped_during_start_up_leaves_no_process_behind(tmp_path, ckpt):
    """SIGTERM during start-up: `up` stops its whole cluster itself. (SIGKILL is not tested here: the
    services and tritonserver end by their parent-death signal, but a Triton python stub still loading
    its model can outlive its server.)"""
    up = subprocess.Popen([sys.executable, "-m", "vitaserve.cli", "up", "--lm", str(ckpt / "lm"),
                           "--tokenizer", str(ckpt / "tokenizer"), "--decoder", str(ckpt / "decoder"),
                           "--port", str(free_port()), "--num-slots", "2", "--max-len", "256",
                           "--logs", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, up.kill)
    watchdog.start()
    try:
        seen = []
        for line in up.stdout:  # blocks until up reports; the watchdog ends a hang
            seen.append(line)
            if "waiting for triton" in line:  # redis ready; triton, encoder, decoder spawned
                break
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        started = {pid for child in children for pid in group_pids(child)}
        assert len(children) == 4, "".join(seen)
        up.send_signal(signal.SIGTERM)
        rest = up.stdout.read()
        code = up.wait()
    finally:
        watchdog.cancel()
    assert code == 130 and "stop requested" in rest and "stopped" in rest, "".join(seen) + rest
    assert not [pid for pid in started if alive(pid)]


@pytest.mark.parametrize("args,words", [
    (["--in", "/nonexistent.wav", "--out", "x.wav"], "no such file"),
    (["--in", __file__, "--out", "x.wav"], "not a WAV"),
    (["--in", __file__, "--out", "x.wav", "--codec", "mulaw", "--rate", "16000"], "8000"),
    (["--in", __file__, "--out", "x.wav", "--codec", "opus"], "unknown codec 'opus'"),
    (["--in", "/", "--out", "x.wav"], "cannot read"),
    (["--in", __file__, "--out", "/nonexistent/x.wav"], "existing folder"),
])
def test_call_argument_errors_are_one_line(args, words):
    done = vita("call", "--target", "127.0.0.1:1", *args, timeout=60)
    assert done.returncode == 2
    assert words in done.stderr and done.stderr.count("\n") <= 1


def test_call_to_no_gateway_fails_in_one_line(question, tmp_path):
    done = vita("call", "--target", f"127.0.0.1:{free_port()}", "--in", str(question),
                "--out", str(tmp_path / "a.wav"), timeout=60)
    assert done.returncode == 2 and "UNAVAILABLE" in done.stderr and done.stderr.count("\n") <= 1
    assert not (tmp_path / "a.wav").exists()


def test_up_checks_the_call_before_starting_anything(tmp_path):
    done = vita("up", "--call", str(tmp_path / "missing.wav"), timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "no such file" in done.stderr
    assert not (tmp_path / "checkpoints").exists() and "starting" not in done.stdout


def test_up_rejects_partial_checkpoint_folders():
    done = vita("up", "--lm", "/tmp", timeout=60)
    assert done.returncode == 2 and "all three" in done.stderr


def test_serve_takes_the_redis_url_from_the_environment_never_a_flag(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITA_REDIS_URL")}

    def serve(*args, **extra_env):
        return subprocess.run([sys.executable, "-m", "vitaserve.cli", "serve", "decoder", "--decoder", str(tmp_path),
                               "--plaintext",
                               *args], env={**env, **extra_env}, capture_output=True, text=True, timeout=120)

    missing = serve()
    assert missing.returncode == 2 and "VITA_REDIS_URL is not set" in missing.stderr
    assert missing.stderr.count("\n") <= 1
    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://:s3cret@127.0.0.1:1/0\n")
    both = serve(VITA_REDIS_URL="redis://127.0.0.1:1/0", VITA_REDIS_URL_FILE=str(url_file))
    assert both.returncode == 2 and "not both" in both.stderr
    from_file = serve(VITA_REDIS_URL_FILE=str(url_file))  # settings accepted: fails later, on the folder
    assert from_file.returncode == 2 and "no config.yaml" in from_file.stderr and "s3cret" not in from_file.stderr
    flag = serve("--redis", "redis://127.0.0.1:1/0", VITA_REDIS_URL="redis://127.0.0.1:1/0")
    assert flag.returncode == 2 and "unrecognized arguments: --redis" in flag.stderr


def test_the_gateway_takes_the_clusters_answer_cap_and_adapters(tmp_path):
    """The protocol comparison caps every answer through the gateway's default (AudioSocket calls
    cannot ask for a cap): the cluster's options parse with the gateway's own CLI to that cap."""
    import argparse

    from vitaserve.gateway.settings import GatewaySettings

    def settings(cluster):
        parser = argparse.ArgumentParser()
        GatewaySettings.add_arguments(parser)
        args = parser.parse_args([*cluster.gateway_options(), "--lm", "x", "--encoder", "e:1", "--decoder", "d:1",
                                  "--triton", "t:1", "--plaintext"])
        return GatewaySettings.from_args(args, {"VITA_REDIS_URL": "redis://localhost:6379/0"})

    capped = LocalCluster(tmp_path, tmp_path, tmp_path, workdir=tmp_path / "a", adapters=["audiosocket"],
                          max_new_tokens=60)
    default = LocalCluster(tmp_path, tmp_path, tmp_path, workdir=tmp_path / "b")
    assert settings(capped).max_new_tokens == 60
    assert settings(default).max_new_tokens == GatewaySettings.max_new_tokens != 60
    assert settings(capped).audiosocket_port == capped.adapter_port("audiosocket")
    with pytest.raises(ClusterError, match="max_new_tokens"):
        LocalCluster(tmp_path, tmp_path, tmp_path, workdir=tmp_path / "c", max_new_tokens=-1)
