"""Run the Triton generator locally: the tritonserver binary that the nvidia-pytriton wheel ships.

Used by `vita-audio up` and the integration tests. The python backend stub embeds the system
libpython3.11 and starts it in isolated mode (PyConfig_InitIsolatedConfig: PYTHONPATH and the user
site are ignored), yet it imports numpy before the model runs. The one way in is a .pth file in that
interpreter's site directory naming this virtualenv's site-packages; `ensure_python_stub` writes it
(and places the 3.11 stub next to libtriton_python.so). The model also gets the path as its
`site_packages` parameter, for images where the stub's Python is another one.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import site
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytriton

from vitaserve.common.tls import ServerTls
from vitaserve.generator.contract import MODEL_NAME


def model_repository_template() -> Path:
    """The model repository shipped inside the package (package data: found the same way in an
    editable checkout and a plain `pip install .`)."""
    return Path(str(importlib.resources.files("vitaserve") / "model_repo"))


def triton_home() -> Path:
    return Path(pytriton.__file__).parent / "tritonserver"


def site_packages() -> str:
    return next(p for p in site.getsitepackages() if p.endswith("site-packages"))


def ensure_python_stub() -> Path:
    """Put the stub for this Python version next to libtriton_python.so (idempotent)."""
    home = triton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    dst = home / "backends" / "python" / "triton_python_backend_stub"
    if not src.exists():
        raise RuntimeError(f"nvidia-pytriton ships no python backend stub for Python {version}")
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        shutil.copy2(src, dst)
    _ensure_site_pth(version)
    return dst


def _ensure_site_pth(version: str) -> None:
    """Make the system Python that the stub embeds see this virtualenv (see the module docstring)."""
    system_site = Path(f"/usr/local/lib/python{version}/dist-packages")
    pth = system_site / "vitaserve-triton-stub.pth"
    # an "import" line runs at start-up; addsitedir also processes the venv's own .pth files
    # (the editable install of vitaserve is one)
    line = f"import site; site.addsitedir({site_packages()!r})\n"
    if pth.exists() and pth.read_text() == line:
        return
    try:
        system_site.mkdir(parents=True, exist_ok=True)
        pth.write_text(line)
    except OSError as exc:
        raise RuntimeError(
            f"cannot write {pth} ({exc}); the Triton python stub needs it to import numpy from this virtualenv"
        ) from exc


def prepare_model_repository(dest: Path, lm_dir: str | Path, device: str = "cpu", dtype: str = "",
                             max_len: int = 4096, num_slots: int = 16, threads: int = 0,
                             template: Path | None = None) -> Path:
    """Copy the model repository (`template`, by default the packaged one) into `dest` with the
    parameters of this deployment filled in."""
    src = (template or model_repository_template()) / MODEL_NAME
    out = dest / MODEL_NAME
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__"))
    values = {"lm_dir": str(Path(lm_dir).resolve()), "device": device, "dtype": dtype, "max_len": str(max_len),
              "num_slots": str(num_slots), "threads": str(threads), "site_packages": site_packages()}
    text = (out / "config.pbtxt").read_text()
    for key, value in values.items():
        text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        if n != 1:
            raise RuntimeError(f"config.pbtxt has no parameter {key!r}")
    (out / "config.pbtxt").write_text(text)
    return dest


def tls_flags(tls: ServerTls | None) -> list[str]:
    """tritonserver's own SSL options for its gRPC port: TLS, and mutual TLS when `tls` has a client
    CA (a client without a certificate from it is refused in the handshake). Triton reads the files
    once at start: a renewed certificate needs a restart (unlike our services, common/tls.py)."""
    if tls is None:
        return []
    flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={tls.cert_file}", f"--grpc-server-key={tls.key_file}"]
    if tls.client_ca_file:
        flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={tls.client_ca_file}"]
    return flags


def start_tritonserver(model_repo: Path, grpc_port: int, http_port: int, metrics_port: int,
                       log_path: Path | None = None, prefix: list[str] | tuple[str, ...] = (),
                       tls: ServerTls | None = None) -> subprocess.Popen:
    """`prefix`: a wrapper command, such as LocalCluster's parent-death signal (setpriv --pdeathsig),
    so that a cluster whose parent is killed leaves no tritonserver behind. `tls`: its gRPC port
    serves (mutual) TLS; HTTP and metrics stay plaintext, for the readiness check and scraping."""
    ensure_python_stub()
    home = triton_home()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site_packages(), env.get("PYTHONPATH")]))
    cmd = [
        *prefix, str(home / "bin" / "tritonserver"), f"--model-repository={model_repo}",
        f"--backend-directory={home / 'backends'}", f"--cache-directory={home / 'caches'}",
        f"--grpc-port={grpc_port}", f"--http-port={http_port}", f"--metrics-port={metrics_port}",
        "--allow-metrics=true", "--allow-gpu-metrics=false", "--log-verbose=0",
        "--exit-on-error=true", "--strict-readiness=true", *tls_flags(tls),
    ]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, http_port: int, timeout_s: float = 120.0) -> None:
    """Block until Triton reports ready; raise with a clear reason if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s")


@contextmanager
def triton_server(workdir: Path, lm_dir: str | Path, num_slots: int = 16, max_len: int = 4096,
                  timeout_s: float = 180.0, tls: ServerTls | None = None) -> Iterator[dict]:
    """A ready tritonserver with the generator on `lm_dir` for the length of the block:
    yields {"grpc": address, "metrics": url, "log": path, "pid": its process}; a failed start raises with the log's tail."""
    from vitaserve.devcluster.processes import free_port

    repo = prepare_model_repository(workdir / "model_repo", lm_dir, num_slots=num_slots, max_len=max_len)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log = workdir / "triton.log"
    proc = start_tritonserver(repo, grpc_port, http_port, metrics_port, log, tls=tls)
    try:
        try:
            wait_ready(proc, http_port, timeout_s=timeout_s)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- triton log ---\n{log.read_text()[-4000:]}") from exc
        yield {"grpc": f"127.0.0.1:{grpc_port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "log": log,
               "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
