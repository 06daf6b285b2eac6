"""`vita-audio up --call` end to end (every service as its own process), and `call` argument errors."""

from __future__ import annotations

import subprocess
import sys
import wave

import pytest

from servers import free_port


def vita(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vitaserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_up_with_a_call_writes_the_answer_and_stops_everything(tmp_path, ckpt):
    question = tmp_path / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(question), "Hello, what time is it?"], check=True)
    answer = tmp_path / "answer.wav"
    port = free_port()
    done = vita("up", "--lm", str(ckpt / "lm"), "--tokenizer", str(ckpt / "tokenizer"),
                "--decoder", str(ckpt / "decoder"), "--port", str(port), "--num-slots", "4", "--max-len", "1024",
                "--call", str(question), "--out", str(answer), "--max-new-tokens", "60")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gateway ready" in done.stdout and "first audio:" in done.stdout and "stopped" in done.stdout
    with wave.open(str(answer)) as w:
        assert w.getframerate() == 8000 and w.getnframes() > 8000 * 0.3
    leftover = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert not leftover  # the gateway (and the rest, stopped before it) are gone


@pytest.mark.parametrize("args,words", [
    (["--in", "/nonexistent.wav", "--out", "x.wav"], "no such file"),
    (["--in", __file__, "--out", "x.wav"], "not a WAV"),
    (["--in", __file__, "--out", "x.wav", "--codec", "mulaw", "--rate", "16000"], "8000"),
])
def test_call_argument_errors_are_one_line(args, words):
    done = vita("call", "--target", "127.0.0.1:1", *args, timeout=60)
    assert done.returncode == 2
    assert words in done.stderr and done.stderr.count("\n") <= 1


def test_up_rejects_partial_checkpoint_folders():
    done = vita("up", "--lm", "/tmp", timeout=60)
    assert done.returncode == 2 and "all three" in done.stderr
