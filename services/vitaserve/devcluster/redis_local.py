"""A local redis-server as the product runs it: append-only persistence, a memory limit, no eviction.

Durability (README "Durability"): every write is appended to the AOF in `workdir/appendonlydir`
before Redis replies; `appendfsync everysec` flushes it to disk once a second. So a kill -9 of
redis-server loses nothing acknowledged (the kernel holds the file) unless a background fsync
stalls: Redis then postpones its AOF write up to 2 s and still replies (the fault matrix saw an
acknowledged turn lost that way on a busy machine); a crash of the machine may lose the last
~1 s. `maxmemory` with `noeviction`: when full, writes fail (OOM) instead of sessions vanishing;
the session store refuses new calls before that (SessionStore.create's headroom).

Restart from the AOF: run `redis_command(port, workdir)` again with the same port and workdir (after
the old process is gone, e.g. killed with -9) and redis-server replays the AOF there. LocalRedis
does that for tests (kill / start); LocalCluster spawns the same command.

TLS (`tls`, a common.tls.ServerTls with a client CA): the port speaks only TLS (`--port 0
--tls-port`), and `auth_clients` says whether clients must present a certificate from that CA
("yes", Redis's default with TLS), may ("optional") or need not ("no"); the URL is then rediss://.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vitaserve.common.tls import ClientTls, ServerTls
from vitaserve.devcluster.processes import ClusterError, free_port

APPENDFSYNC = "everysec"  # always | everysec | no: when the AOF is flushed to disk (README "Durability")
MAXMEMORY = "256mb"  # the local cluster and the tests; the chart sets its own (values.yaml redis.maxmemory)


def redis_command(port: int, workdir: Path, *, maxmemory: str = MAXMEMORY,
                  appendfsync: str = APPENDFSYNC, tls: ServerTls | None = None,
                  auth_clients: str = "yes") -> list[str]:
    """redis-server on 127.0.0.1:port keeping its AOF in workdir: run it again with the same port and
    workdir to restart it from that AOF (no RDB snapshots: the AOF is the one copy). With `tls` the
    port speaks TLS only (module docstring)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ClusterError("redis-server is not installed (run scripts/setup.sh, or apt-get install redis-server)")
    if tls is None:
        listen = ["--port", str(port)]
    else:
        if tls.client_ca_file is None or auth_clients not in ("yes", "optional", "no"):
            raise ValueError("a TLS redis-server needs a client CA file and auth_clients yes, optional or no")
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", tls.cert_file,
                  "--tls-key-file", tls.key_file, "--tls-ca-cert-file", tls.client_ca_file,
                  "--tls-auth-clients", auth_clients]
    return [exe, *listen, "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--appendonly", "yes", "--appendfsync", appendfsync,
            "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"]


def local_redis_url(port: int, tls: bool = False) -> str:
    return f"{'rediss' if tls else 'redis'}://127.0.0.1:{port}/0"


def ssl_context(client: ClientTls):
    """A Python ssl context for `client`: trusts its CA only, checks the host name, presents its certificate."""
    import ssl

    context = ssl.create_default_context(cafile=client.ca_file)
    if client.cert_file:
        context.load_cert_chain(client.cert_file, client.key_file)
    return context


def wait_redis_ready(port: int, proc: subprocess.Popen, timeout_s: float, client: ClientTls | None = None) -> None:
    """Until PING answers PONG: the port opens before the AOF is replayed (LOADING until then).
    `client`: the port speaks TLS, and this is who asks."""
    context = ssl_context(client) if client is not None else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"redis-server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
                s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise ClusterError(f"redis-server on port {port} not ready after {timeout_s:.0f} s")


class LocalRedis:
    """One redis-server on a fixed port and folder that can be killed and started again from its AOF."""

    def __init__(self, workdir: Path, port: int | None = None, probe: ClientTls | None = None, **options):
        """`options`: redis_command's (tls, auth_clients, ...); `probe`: the client identity the
        readiness check uses on a TLS port."""
        self.workdir, self.port, self.options, self.probe = Path(workdir), port or free_port(), options, probe
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return local_redis_url(self.port, tls=self.options.get("tls") is not None)

    def start(self, timeout_s: float = 10.0) -> "LocalRedis":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(redis_command(self.port, self.workdir, **self.options),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_redis_ready(self.port, self.proc, timeout_s, self.probe)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig`; for SIGKILL / SIGTERM wait until the process is gone (the port is then free)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it was stopped
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def redis_server(workdir: Path, timeout_s: float = 10.0, **options: str) -> Iterator[str]:
    """A redis-server for the length of the block; yields its URL (the tests' session store)."""
    redis = LocalRedis(workdir, **options).start(timeout_s)
    try:
        yield redis.url
    finally:
        redis.stop()
