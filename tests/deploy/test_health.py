"""``midasheng health HOST:PORT``: the gRPC health check every container and probe uses."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main
from services.cli.health import SERVICES
from services.jobs.server import JobsServer, start_jobs_server
from services.pb.midasheng.v1 import captions_pb2, encoder_pb2, jobs_pb2, lm_pb2
from services.transport.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def jobs_server(redis_url: str) -> Iterator[JobsServer]:
    srv = start_jobs_server(redis_url)
    yield srv
    srv.stop(grace=0.5)


def test_short_names_are_the_real_services() -> None:
    assert SERVICES == {
        "gateway": captions_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name,
        "encoder": encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name,
        "lm": lm_pb2.DESCRIPTOR.services_by_name["LMService"].full_name,
        "jobs": jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    }


def test_serving_is_0_anything_else_is_1(jobs_server: JobsServer, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{jobs_server.port}"
    assert main(["health", target]) == 0
    assert main(["health", target, "--service", "jobs"]) == 0
    assert "SERVING" in capsys.readouterr().out
    t0 = time.monotonic()
    assert main(["health", target, "--service", "encoder", "--timeout", "0.5"]) == 1  # not this server's
    assert time.monotonic() - t0 < 3.0
    assert "not serving" in capsys.readouterr().err
    assert main(["health", f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1  # nobody there


def test_the_light_entry_point_answers_fast(jobs_server: JobsServer) -> None:
    """``python -m services.cli.health`` (the containers' HEALTHCHECK) skips loading the other commands."""
    target = f"127.0.0.1:{jobs_server.port}"
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.health", target, "--service", "jobs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - t0 < 3.0, "the health check should not load torch"
    down = subprocess.run(
        [sys.executable, "-m", "services.cli.health", f"127.0.0.1:{free_port()}", "--timeout", "0.3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and "not serving" in down.stderr
