"""The package installs as a plain (non-editable) wheel: the import path is the disk path inside the
wheel, the generated API and the Triton model repository come along, and the CLI starts."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_without_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("vitaserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vitaserve/api/conversation_pb2.py" in names
    assert "vitaserve/model_repo/vita_generator/config.pbtxt" in names
    assert "vitaserve/model_repo/vita_generator/1/model.py" in names
    assert not [n for n in names if n.startswith(("services/", "tests/"))]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # PYTHONPATH comes before the checkout's editable finder: this imports the installed copy
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import vitaserve, vitaserve.api.conversation_pb2_grpc as g;"
             "from vitaserve.devcluster.triton_local import model_repository_template as t;"
             "print(vitaserve.__file__); print((t() / 'vita_generator' / 'config.pbtxt').is_file())")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "True"
    cli = subprocess.run([sys.executable, "-m", "vitaserve.cli", "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "make-checkpoint" in cli.stdout
