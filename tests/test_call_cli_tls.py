"""`vita-audio call` on the secure edge: --tls-ca for a gateway serving TLS, the API key from
$VITA_API_KEY (sent as x-api-key, never in argv), on a real gateway of the test cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vitaserve.client.file_call import CallSetupError, FileCall, caller_metadata, prepare
from vitaserve.common.wav import write_wav


def test_the_key_comes_from_the_environment_only():
    assert caller_metadata({"VITA_API_KEY": " k-123 \n"}) == (("x-api-key", "k-123"),)
    assert caller_metadata({}) == () and caller_metadata({"VITA_API_KEY": ""}) == ()


@pytest.mark.parametrize("content, words", [(None, "No such file"), ("not a certificate", "not PEM")])
def test_a_bad_ca_file_is_named_before_connecting(tmp_path, utterance, content, words):
    question = tmp_path / "q.wav"
    write_wav(question, utterance, 16000)
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    with pytest.raises(CallSetupError, match=f"--tls-ca: .*{ca}.*{words}"):
        prepare(FileCall(str(question), str(tmp_path / "a.wav"), tls_ca=str(ca)))


def call(tmp_path, utterance, target: str, *flags: str, key: str | None) -> subprocess.CompletedProcess:
    question = tmp_path / "question.wav"
    write_wav(question, utterance, 16000)
    env = {k: v for k, v in os.environ.items() if k != "VITA_API_KEY"}
    if key is not None:
        env["VITA_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "vitaserve.cli", "call", "--target", target, "--in", str(question),
                           "--out", str(tmp_path / "answer.wav"), "--max-new-tokens", "40", *flags],
                          capture_output=True, text=True, timeout=180, env=env)


def test_call_over_tls_with_the_key_from_the_environment(tls_gateway, utterance, tmp_path):  # noqa: F811
    target, ca, key = tls_gateway
    done = call(tmp_path, utterance, target, "--tls-ca", str(ca), key=key)
    assert done.returncode == 0, done.stderr
    assert "first audio:" in done.stdout and (tmp_path / "answer.wav").stat().st_size > 44
    # without the key: UNAUTHENTICATED, and the message says where the key goes
    refused = call(tmp_path, utterance, target, "--tls-ca", str(ca), key=None)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr and "$VITA_API_KEY" in refused.stderr
    # plaintext to the TLS port: the call fails, it does not fall back
    plain = call(tmp_path, utterance, target, key=key)
    assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr
