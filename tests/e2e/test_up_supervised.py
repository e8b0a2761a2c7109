"""``midasheng up`` as an operator runs it, secured and supervised: the encoder and LM listen on
loopback and refuse callers without the service token only the children know, the private Redis
has a password, no secret is in any command line or in the output; a crashed LM is restarted with
a backoff and the stack serves again; an LM that keeps crashing stops the stack with the reason.
``--host`` beyond loopback without TLS and API keys is refused before anything starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
import redis

from services.pb.midasheng.v1 import captions_pb2_grpc, lm_pb2, lm_pb2_grpc
from tests.e2e.helpers import clip, collect, requests_for
from tests.e2e.test_up import REDIS_LINE, ROOT, UP_LINE, UP_TIMEOUT_S, Up, gone

pytestmark = pytest.mark.slow


def lm_process(up: Up) -> psutil.Process:
    found = [
        p
        for p in psutil.Process(up.proc.pid).children(recursive=True)
        if "services lm" in " ".join(p.cmdline())
    ]
    assert len(found) == 1, found
    return found[0]


def wait_log(up: Up, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, up.log.read_text())
        if m:
            return m.group(0)
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the log:\n{up.log.read_text()[-3000:]}")


def test_up_is_locked_down_and_restarts_a_crashed_child_then_stops_when_it_keeps_crashing(
    tmp_path: Path,
) -> None:
    up = Up(tmp_path / "up.log", "--max-restarts", "1", "--restart-backoff-s", "0.5", "--http-port", "0")
    try:
        gateway = up.wait_for(UP_LINE, UP_TIMEOUT_S).group(1)
        masked = up.wait_for(REDIS_LINE, 10).group(1)
        assert ":***@" in masked, masked  # the password is not printed
        procs = psutil.Process(up.proc.pid).children(recursive=True)
        up.descendants = procs
        env_secrets = []
        for p in procs:
            cmd = " ".join(p.cmdline())
            assert "--redis-url" not in cmd and "requirepass" not in cmd, cmd
            if "services" in cmd:
                env = p.environ()
                env_secrets += [env["REDIS_URL"], env["MIDASHENG_SERVICE_TOKEN"]]
                for addr in p.net_connections(kind="tcp"):
                    if addr.status == psutil.CONN_LISTEN and "services gateway" not in cmd:
                        assert addr.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1"), (cmd, addr)
        redis_url, token = env_secrets[0], env_secrets[1]
        output = "".join(up.stdout) + up.log.read_text()
        assert redis_url not in output and token not in output
        assert redis_url.split("@")[0].split(":")[-1] not in output  # the password
        # The private Redis wants its password.
        port = int(masked.rsplit(":", 1)[1].split("/")[0])
        anon = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            anon.ping()
        anon.close()
        # The LM answers only with the service token.
        lm_port = next(
            a.laddr.port for a in lm_process(up).net_connections(kind="tcp") if a.status == psutil.CONN_LISTEN
        )
        with grpc.insecure_channel(f"127.0.0.1:{lm_port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                lm_pb2_grpc.LMServiceStub(ch).GetStats(lm_pb2.GetStatsRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A crash is restarted with a backoff, logged, and the stack serves again.
        first = lm_process(up)
        os.kill(first.pid, signal.SIGKILL)
        wait_log(up, r"lm-0 exited with code -9; restarting it in 0\.5 s", 15)
        wait_log(up, r"restarting lm-0 \(restart 1\)", 15)
        deadline = time.monotonic() + 60
        while up.log.read_text().count("[lm-0] lm ready on port") < 2:
            assert time.monotonic() < deadline, up.log.read_text()[-3000:]
            time.sleep(0.2)
        second = lm_process(up)
        assert second.pid != first.pid
        with grpc.insecure_channel(gateway) as ch:
            stub = captions_pb2_grpc.CaptionServiceStub(ch)
            res = collect(stub.StreamCaptions(requests_for(clip([("high_tone", 3.0)])), timeout=120))
        assert res.error is None and res.finals, res.table()

        # Crashing again within the window: more than --max-restarts 1, the stack stops with the reason.
        os.kill(second.pid, signal.SIGKILL)
        assert up.proc.wait(timeout=60) == 1, up.log.read_text()[-3000:]
        wait_log(up, r"lm-0 exited with code -9, 2 times within 300 s \(at most 1 restarts\); stopping", 5)
        deadline = time.monotonic() + 10
        while not all(gone(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p.pid for p in procs if not gone(p)] == [], "processes left behind"
    finally:
        if up.proc.poll() is None:
            up.kill_everything([p.pid for p in up.descendants])
        up.close()


def test_up_refuses_a_public_host_without_tls_and_api_keys(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "services", "up", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "without TLS (--tls-cert/--tls-key) and without API keys (--api-keys-file)" in out.stderr, (
        out.stderr
    )
    assert "--allow-insecure-host" in out.stderr
    assert "midasheng is up" not in out.stdout
    assert time.monotonic() - t0 < 30  # refused before anything was started
