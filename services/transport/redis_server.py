"""A private ``redis-server`` on a free loopback port, for ``midasheng up`` and the tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.errors import MidashengError

START_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateRedis:
    """A redis-server child process bound to 127.0.0.1; stopped by PID."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    _owned_dir: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_private_redis(
    port: int | None = None, workdir: Path | None = None, binary: str = "redis-server"
) -> PrivateRedis:
    """Start ``redis-server`` without persistence on 127.0.0.1 and wait until it answers PING."""
    exe = shutil.which(binary)
    if exe is None:
        raise MidashengError(
            "redis-server was not found on PATH. Install it (Debian/Ubuntu: apt-get install redis-server) "
            "or point REDIS_URL at an existing Redis."
        )
    owned = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="midasheng-redis-")) if workdir is None else workdir
    port = port or free_port()
    cmd = [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(wd),
        "--protected-mode",
        "yes",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = PrivateRedis(port=port, process=proc, workdir=wd, _owned_dir=owned)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise MidashengError(f"redis-server exited with code {proc.returncode}: {err.strip()[:500]}")
            try:
                if client.ping():
                    return server
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise MidashengError(
                    f"redis-server did not answer on port {port} within {START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.02)
    finally:
        client.close()
