"""A real `redis-server` on a free loopback port, for the tests that share state across gateway processes.

Not skipped when missing: `.ci/run` installs Debian's redis-server, and a test suite that silently skips the
multi-node tests would prove nothing about them.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], workdir: str) -> None:
        self.port = port
        self.proc = proc
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.02)
    raise RuntimeError("redis-server did not answer PING in time")


@contextlib.contextmanager
def redis_server(port: int | None = None, workdir: str | None = None) -> Iterator[RedisServer]:
    """Start redis-server on 127.0.0.1; stopped on exit. `port`: restart on the same port. `workdir`: keep
    the data there (append-only file, fsync always), so a restart on the same one finds it again; without it,
    no persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server; .ci/run does)")
    port = port or free_port()
    keep = workdir is not None
    workdir = workdir or tempfile.mkdtemp(prefix="hedgerow-redis-")
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if keep else ["--appendonly", "no"]
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence, "--dir", workdir]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, proc, workdir)
    try:
        _wait_ready(port, proc)
        yield server
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
