"""``midasheng up`` as a user runs it: starts, serves a stream, stops cleanly on Ctrl-C (SIGINT)
leaving no process behind, its private redis-server included."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from services.audio.io import write_wav
from services.rpc import wait_healthy
from services.training.synth import types_in_caption
from tests.e2e.helpers import clip

ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
UP_LINE = re.compile(r"midasheng is up: gRPC gateway at (\S+:\d+)")
REDIS_LINE = re.compile(r"redis: (redis://\S+)")

pytestmark = pytest.mark.slow


class Up:
    def __init__(self, log: Path, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["PYTHONUNBUFFERED"] = "1"
        self._log = log.open("w")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services", "up", "--port", "0", "--device", "cpu", *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self.pgid = os.getpgid(self.proc.pid)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.descendants: list[psutil.Process] = []  # recorded once the stack is up
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, (
                f"no {pattern.pattern!r} (exit {self.proc.poll()}):\n{''.join(self.stdout)}\n"
                f"{self.log.read_text()[-3000:]}"
            )
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            m = pattern.search(line)
            if m:
                return m

    def kill_everything(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "tone_then_noise.wav"
    write_wav(path, clip([("high_tone", 10.0), ("white_noise", 10.0)], seed=1))
    return path


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path / "up.log")
    try:
        yield u
    finally:
        if u.proc.poll() is None:
            u.kill_everything([p.pid for p in u.descendants])
        u.close()


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_up_serves_a_stream_and_stops_cleanly_on_sigint(up: Up, wav: Path) -> None:
    gateway = up.wait_for(UP_LINE, UP_TIMEOUT_S).group(1)
    redis_url = up.wait_for(REDIS_LINE, 10).group(1)
    procs = psutil.Process(up.proc.pid).children(recursive=True)
    up.descendants = procs
    cmdlines = [" ".join(p.cmdline()) for p in procs]
    for part in ("redis-server", "services encoder", "services lm", "services gateway"):
        assert any(part in c for c in cmdlines), cmdlines
    assert not gateway.endswith(":0")
    assert wait_healthy(gateway, "midasheng.v1.CaptionService", timeout=10)

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services",
            "stream",
            str(wav),
            "--server",
            gateway,
            "--speed",
            "4",  # 4x real time: the LM keeps up, so interims are not all coalesced away
            "--timeout",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    finals = [ln for ln in lines if "(final)" in ln]
    assert len(finals) == 2, out.stdout
    assert finals[0].startswith("[00:00.0-00:10.0]") and finals[1].startswith("[00:10.0-00:20.0]"), out.stdout
    assert "high_tone" in types_in_caption(finals[0].split("(final)")[1]), finals
    assert "white_noise" not in types_in_caption(finals[0].split("(final)")[1]), finals
    assert "white_noise" in types_in_caption(finals[1].split("(final)")[1]), finals
    assert any("(interim" in ln for ln in lines), out.stdout
    assert lines[0].startswith("# session ") and re.match(r"# ended after 20\.0 s", lines[-1]), out.stdout

    os.kill(up.proc.pid, signal.SIGINT)
    assert up.proc.wait(timeout=STOP_TIMEOUT_S) == 0, up.log.read_text()[-3000:]
    up._reader.join(timeout=5)
    assert any("midasheng up: stopped" in ln for ln in up.stdout), up.stdout
    deadline = time.monotonic() + 5
    while not all(gone(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.pid for p in procs if not gone(p)] == [], "processes left behind"
    with pytest.raises(ProcessLookupError):
        os.killpg(up.pgid, 0)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()
