"""Training workers: cancel within a step, retries end in FAILED, takeover after kill -9, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from services.cli import main as cli_main
from services.jobs import worker as worker_module
from services.model.checkpoint import load_model
from services.pb.midasheng.v1 import jobs_pb2
from tests.jobs.conftest import FAST, done, events, hp, wait_job


def test_cancel_during_training_stops_within_a_step(jobs, worker_thread, tiny_csv: Path) -> None:
    _, stub = jobs
    worker_thread()
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(
            name="cancel-me", dataset_uri=str(tiny_csv), hyperparameters=hp(max_steps=500)
        ),
        timeout=30,
    )
    wait_job(stub, job.id, lambda j: j.status == jobs_pb2.RUNNING and j.step >= 5, timeout=60)
    stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=10)
    asked_at = time.monotonic()
    job = wait_job(stub, job.id, done, timeout=30)
    assert time.monotonic() - asked_at < 10
    assert job.status == jobs_pb2.CANCELLED and 5 <= job.step < 500
    last = events(stub, job.id)[-1]
    assert last.kind == jobs_pb2.JobEvent.STATUS and last.status == jobs_pb2.CANCELLED
    assert "Cancelled at step" in last.message


def test_a_job_that_keeps_failing_ends_failed_after_max_attempts(
    jobs, worker_thread, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stub = jobs

    def broken(*_: object) -> None:
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(worker_module, "train_config", broken)
    worker_thread()
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(name="flaky", dataset_uri=str(tiny_csv), hyperparameters=hp()), timeout=30
    )
    job = wait_job(stub, job.id, done, timeout=60)
    assert job.status == jobs_pb2.FAILED and job.error.code == "internal"
    assert "simulated device fault" in job.error.message
    starts = [
        e for e in events(stub, job.id) if e.kind == jobs_pb2.JobEvent.STATUS and e.status == jobs_pb2.RUNNING
    ]
    assert len(starts) == FAST.max_attempts  # retried, then given up: no loop


def test_export_writes_a_loadable_merged_checkpoint(
    jobs, worker_thread, tiny_csv: Path, tmp_path: Path, redis_url: str
) -> None:
    _, stub = jobs
    worker_thread()
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(
            name="to-export", dataset_uri=str(tiny_csv), hyperparameters=hp(max_steps=3)
        ),
        timeout=30,
    )
    job = wait_job(stub, job.id, done, timeout=120)
    assert job.status == jobs_pb2.SUCCEEDED and job.adapter_name == "to-export"
    adapter = stub.GetAdapter(jobs_pb2.GetAdapterRequest(name="to-export"), timeout=10)
    assert (
        adapter.job_id == job.id
        and adapter.lora_rank == 4
        and (Path(adapter.path) / "adapter_config.json").exists()
    )
    listed = stub.ListAdapters(jobs_pb2.ListAdaptersRequest(), timeout=10)
    assert [a.name for a in listed.adapters] == ["to-export"]
    out = tmp_path / "merged"
    assert cli_main(["adapters", "export", "to-export", "--out", str(out), "--redis-url", redis_url]) == 0
    model = load_model(out)
    assert model.config.text_config["vocab_size"] == load_model(None).config.text_config["vocab_size"]


def _spawn_worker(redis_url: str, jobs_dir: Path, worker_id: str, log: BinaryIO) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "services",
        "worker",
        "--redis-url",
        redis_url,
        "--jobs-dir",
        str(jobs_dir),
        "--worker-id",
        worker_id,
        "--device",
        "cpu",
        "--checkpoint-every",
        "5",
        "--metrics-every",
        "5",
        "--lease-ttl-ms",
        str(FAST.lease_ttl_ms),
        "--heartbeat-ms",
        str(FAST.heartbeat_ms),
        "--claim-min-idle-ms",
        str(FAST.claim_min_idle_ms),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_killed_worker_is_taken_over_and_the_job_resumes_from_its_checkpoint(
    jobs, redis_url: str, tiny_csv: Path, tmp_path: Path
) -> None:
    _, stub = jobs
    logs = {w: (tmp_path / f"{w}.log").open("wb") for w in ("wa", "wb")}
    procs = {w: _spawn_worker(redis_url, tmp_path / "jobs", w, logs[w]) for w in logs}
    try:
        job = stub.CreateJob(
            jobs_pb2.CreateJobRequest(
                name="survivor", dataset_uri=str(tiny_csv), hyperparameters=hp(max_steps=40)
            ),
            timeout=30,
        )
        running = wait_job(
            stub, job.id, lambda j: bool(j.latest_checkpoint_path) and j.step >= 5, timeout=120
        )
        first = _worker_of(stub, job.id)
        procs[first].send_signal(signal.SIGKILL)
        procs[first].wait(timeout=10)
        assert running.step < 40
        final = wait_job(stub, job.id, done, timeout=180)
        assert final.status == jobs_pb2.SUCCEEDED, final.error.message
        evs = events(stub, job.id)
        takeover = [e for e in evs if e.kind == jobs_pb2.JobEvent.STATUS and "took over" in e.message]
        assert len(takeover) == 1 and f"from worker {first}" in takeover[0].message
        resumed = [e for e in evs if e.kind == jobs_pb2.JobEvent.LOG and e.message.startswith("Resumed from")]
        assert resumed and resumed[0].step > 0  # from the last checkpoint, not from step 0
        assert evs.index(takeover[0]) < evs.index(resumed[0])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        for f in logs.values():
            f.close()


def _worker_of(stub, job_id: str) -> str:  # type: ignore[no-untyped-def]
    starts = [
        e.message
        for e in events(stub, job_id)
        if e.kind == jobs_pb2.JobEvent.STATUS and e.status == jobs_pb2.RUNNING
    ]
    return starts[-1].split()[1] if starts else ""
