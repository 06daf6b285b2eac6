"""A caller not written in Python (issue 13 item 8): tests/node/client.js, Node's @grpc/grpc-js with
the API loaded from protos/ at run time, calls a real gateway (real encoder, Triton, decoders, Redis
on loopback) over TLS with an API key (x-api-key), speaks G.711 mu-law at 8 kHz and must get audio
back in that format; without the key, or with a wrong one, it gets UNAUTHENTICATED."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vitaserve.gateway.codecs import encode_audio

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
    reason="node or tests/node/node_modules missing (scripts/setup.sh runs npm ci there)")


def run_node_client(tmp_path: Path, target: str, utterance, *flags: str, env: dict[str, str] | None = None,
                    timeout_s: float = 180) -> tuple[int, dict]:
    """Run client.js once; (exit code, the JSON line it printed)."""
    audio = tmp_path / "question.ulaw"
    audio.write_bytes(encode_audio(utterance, "mulaw", 8000))
    child_env = {k: v for k, v in os.environ.items() if k != "VITA_API_KEY"}
    child_env.update(env or {})
    proc = subprocess.run([NODE, str(NODE_DIR / "client.js"), "--target", target, "--audio", str(audio),
                           "--max-new-tokens", "40", "--timeout-s", str(int(timeout_s) - 10), *flags],
                          capture_output=True, text=True, timeout=timeout_s, env=child_env)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"client.js printed nothing (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(lines[-1])


def test_node_client_over_tls_with_an_api_key_gets_mulaw_audio_back(tls_gateway, utterance, tmp_path):
    target, ca, key = tls_gateway
    code, result = run_node_client(tmp_path, target, utterance, "--ca", str(ca), env={"VITA_API_KEY": key})
    assert code == 0 and result["status"] == "OK", result
    assert not result["errors"], result
    assert len(result["session_id"]) == 32  # 128 bits, hex
    assert result["output_format"] == {"codec": "AUDIO_CODEC_MULAW", "sample_rate": 8000}
    assert result["audio_formats"] == ["AUDIO_CODEC_MULAW/8000"]
    assert result["turn_finished"]["turn"] == 1 and result["turn_finished"]["audio_tokens"] > 0
    # mu-law is one byte per sample: at least the 0.1 s of audio that one decoder block of 10 tokens holds
    assert result["audio_chunks"] >= 1 and result["audio_bytes"] >= 800, result


@pytest.mark.parametrize("key", [None, "not-a-key"], ids=["no key", "wrong key"])
def test_node_client_without_a_valid_key_is_unauthenticated(tls_gateway, utterance, tmp_path, key):
    target, ca, _ = tls_gateway
    code, result = run_node_client(tmp_path, target, utterance, "--ca", str(ca),
                                   env={"VITA_API_KEY": key} if key else {}, timeout_s=60)
    assert code == 1 and result["status"] == "UNAUTHENTICATED", result
    assert not result["session_id"] and not result["audio_bytes"]
