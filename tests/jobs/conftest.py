"""Fixtures of the jobs tests: a tiny dataset, a JobService on loopback, training workers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from services.jobs.server import JobsServer, start_jobs_server
from services.jobs.store import JobDefaults
from services.jobs.worker import TrainingWorker, WorkerSettings
from services.pb.midasheng.v1 import jobs_pb2, jobs_pb2_grpc
from services.training.synth import generate_dataset

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAST = JobDefaults(lease_ttl_ms=1000, heartbeat_ms=200, claim_min_idle_ms=1500, block_ms=200)
TERMINAL = (jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 short clips (three sound types): enough for a few fast training steps."""
    return generate_dataset(
        tmp_path_factory.mktemp("tiny"), 24, seed=5, types=["siren", "pink_noise", "low_tone"], progress=False
    )


@pytest.fixture
def jobs(redis_url: str) -> Iterator[tuple[JobsServer, jobs_pb2_grpc.JobServiceStub]]:
    srv = start_jobs_server(redis_url)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield srv, jobs_pb2_grpc.JobServiceStub(channel)
    channel.close()
    srv.stop(grace=0.5)


@pytest.fixture
def worker_thread(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., TrainingWorker]]:
    """Factory: start a TrainingWorker loop in a thread (stopped at teardown)."""
    running: list[tuple[TrainingWorker, threading.Thread]] = []

    def start(**kw: object) -> TrainingWorker:
        settings = dict(
            jobs_dir=tmp_path / "jobs",
            worker_id=f"t{len(running)}",
            device="cpu",
            defaults=FAST,
            checkpoint_every=5,
            metrics_every=5,
        )
        settings.update(kw)
        w = TrainingWorker(redis_url, WorkerSettings(**settings))  # type: ignore[arg-type]
        t = threading.Thread(target=w.run, name="test-trainer", daemon=True)
        t.start()
        running.append((w, t))
        return w

    yield start
    for w, _ in running:
        w.stop_event.set()
    for w, t in running:
        t.join(timeout=60)
        w.store.close()


def hp(**kw: object) -> jobs_pb2.Hyperparameters:
    base: dict[str, object] = dict(
        learning_rate=1e-3,
        max_steps=20,
        batch_size=2,
        warmup_steps=2,
        lora_rank=4,
        lora_targets=list(DECODER_TARGETS),
        checkpoint_every=5,
    )
    base.update(kw)
    return jobs_pb2.Hyperparameters(**base)  # type: ignore[arg-type]


def wait_job(
    stub: jobs_pb2_grpc.JobServiceStub,
    job_id: str,
    until: Callable[[jobs_pb2.Job], bool],
    timeout: float = 120.0,
) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} still {jobs_pb2.JobStatus.Name(job.status)} at step {job.step}"
            )
        time.sleep(0.1)


def done(job: jobs_pb2.Job) -> bool:
    return job.status in TERMINAL


def events(stub: jobs_pb2_grpc.JobServiceStub, job_id: str) -> list[jobs_pb2.JobEvent]:
    return list(stub.StreamJobEvents(jobs_pb2.JobEventsRequest(job_id=job_id), timeout=10))
