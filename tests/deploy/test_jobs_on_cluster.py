"""A training job end to end on Redis beyond one node: the jobs API and a training worker (and the
worker's training child process) reach a 3-primary Redis Cluster and a Sentinel group through
their URLs alone; the job's keys share one hash slot, its scripts touch only that slot."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.jobs.server import start_jobs_server
from services.jobs.worker import TrainingWorker, WorkerSettings
from services.pb.midasheng.v1 import jobs_pb2, jobs_pb2_grpc
from services.training.synth import generate_dataset
from services.transport import keys
from services.transport.connect import connect
from services.transport.redis_server import start_private_cluster, start_private_sentinel
from tests.jobs.conftest import FAST, done, hp, wait_job


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("clips"), 12, seed=9, types=["siren", "low_tone"], progress=False
    )


@pytest.fixture(params=["cluster", "sentinel"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "cluster":
        with start_private_cluster(primaries=3, replicas=1) as cluster:
            yield cluster.url + "?wait_replicas=1"
    else:
        with start_private_sentinel(replicas=1, sentinels=3) as group:
            yield group.url + "?wait_replicas=1"


def test_a_training_job_runs_to_the_end(url: str, dataset: Path, tmp_path: Path) -> None:
    srv = start_jobs_server(url, defaults=FAST)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    worker = TrainingWorker(
        url,
        WorkerSettings(
            jobs_dir=tmp_path / "jobs",
            worker_id="t0",
            device="cpu",
            defaults=FAST,
            checkpoint_every=2,
            metrics_every=2,
        ),
    )
    thread = threading.Thread(target=worker.run, name="cluster-trainer", daemon=True)
    thread.start()
    try:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = stub.CreateJob(
            jobs_pb2.CreateJobRequest(
                name="on-a-cluster", dataset_uri=str(dataset), hyperparameters=hp(max_steps=4)
            ),
            timeout=30,
        )
        job = wait_job(stub, job.id, done, timeout=240)
        assert job.status == jobs_pb2.SUCCEEDED, jobs_pb2.JobStatus.Name(job.status)
        assert job.step == 4
        client = connect(url)
        try:  # the job's document and events are where the hash tag puts them, side by side
            assert client.hget(keys.job_key(job.id), "status") == b"succeeded"
            assert client.xlen(keys.job_events_key(job.id)) >= 3
        finally:
            client.close()
    finally:
        worker.stop_event.set()
        thread.join(timeout=60)
        worker.store.close()
        channel.close()
        srv.stop(grace=0.5)
