"""JobService over real gRPC and Redis: validation, paging, errors, cancel before start, torchrun dry run."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import grpc
import pytest

from services.jobs.model import Adapter
from services.pb.midasheng.v1 import jobs_pb2
from tests.jobs.conftest import done, events, hp, wait_job


def _bad_csv(tiny_csv: Path, tmp_path: Path) -> Path:
    """Row 2 names a missing audio file, row 3 has an empty prediction."""
    with tiny_csv.open(newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[1:5]
    data = [[str((tiny_csv.parent / r[0]).resolve()), *r[1:]] for r in data]
    data[1][0] = str(tmp_path / "missing.wav")
    data[2][3] = ""
    path = tmp_path / "bad.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *data])
    return path


def test_bad_dataset_fails_validation_with_row_numbers(jobs, tiny_csv: Path, tmp_path: Path) -> None:
    _, stub = jobs
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(name="bad", dataset_uri=str(_bad_csv(tiny_csv, tmp_path))), timeout=30
    )
    assert job.status == jobs_pb2.FAILED
    assert job.error.code == "invalid_dataset" and "2, 3" in job.error.message
    by_row = {p.row: p for p in job.problems}
    assert set(by_row) == {2, 3}
    assert by_row[2].code == "audio_not_found" and "missing.wav" in by_row[2].message
    assert by_row[3].code == "empty_prediction"
    statuses = [e.status for e in events(stub, job.id) if e.kind == jobs_pb2.JobEvent.STATUS]
    assert statuses == [jobs_pb2.VALIDATING, jobs_pb2.FAILED]  # never queued: no GPU time


def test_missing_base_model_fails_clearly(jobs, tiny_csv: Path, tmp_path: Path) -> None:
    _, stub = jobs
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(
            name="nobase", dataset_uri=str(tiny_csv), base_model=str(tmp_path / "no-such-model")
        ),
        timeout=30,
    )
    assert job.status == jobs_pb2.FAILED
    assert job.error.code == "base_model_not_found"
    assert "no-such-model" in job.error.message and "does not exist" in job.error.message


def test_defaults_are_filled_in_and_bad_requests_are_rejected(jobs, tiny_csv: Path) -> None:
    _, stub = jobs
    job = stub.CreateJob(jobs_pb2.CreateJobRequest(name="defaults", dataset_uri=str(tiny_csv)), timeout=30)
    assert job.status == jobs_pb2.QUEUED
    r = job.request
    assert (
        r.base_model == "demo"
        and r.method == jobs_pb2.LORA
        and r.num_gpus == 1
        and r.adapter_name == "defaults"
    )
    assert r.hyperparameters.learning_rate == pytest.approx(1e-4) and r.hyperparameters.batch_size == 8
    assert r.hyperparameters.lora_rank == 8 and "q_proj" in r.hyperparameters.lora_targets
    for bad, words in (
        (dict(name="has space"), "name must be"),
        (dict(name="x", hyperparameters=jobs_pb2.Hyperparameters(learning_rate=2.0)), "learning_rate"),
        (dict(name="x", num_gpus=65), "num_gpus"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateJob(jobs_pb2.CreateJobRequest(dataset_uri=str(tiny_csv), **bad), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_get_unknown_job_is_not_found_and_list_pages_with_a_cursor(jobs, tiny_csv: Path) -> None:
    _, stub = jobs
    with pytest.raises(grpc.RpcError) as err:
        stub.GetJob(jobs_pb2.GetJobRequest(job_id="job-nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamJobEvents(jobs_pb2.JobEventsRequest(job_id="job-nope"), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    created = [
        stub.CreateJob(jobs_pb2.CreateJobRequest(name=f"j{i}", dataset_uri=str(tiny_csv)), timeout=30).id
        for i in range(5)
    ]
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2, page_token=token), timeout=10)
        seen += [j.id for j in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == created[::-1] and pages == 3  # newest first, 2 + 2 + 1
    cancelled = stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=created[0]), timeout=10)
    assert cancelled.status == jobs_pb2.CANCELLED  # not started yet: cancelled at once
    only = stub.ListJobs(jobs_pb2.ListJobsRequest(statuses=[jobs_pb2.CANCELLED]), timeout=10)
    assert [j.id for j in only.jobs] == [created[0]]
    with pytest.raises(grpc.RpcError) as err:
        stub.ListJobs(jobs_pb2.ListJobsRequest(page_token="!!"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_taken_adapter_name_is_already_exists(jobs, tiny_csv: Path) -> None:
    srv, stub = jobs
    srv.api.store.register_adapter(Adapter(name="taken", base_model="demo", path="/nowhere"))
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(jobs_pb2.CreateJobRequest(name="taken", dataset_uri=str(tiny_csv)), timeout=30)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stub.GetAdapter(jobs_pb2.GetAdapterRequest(name="taken"), timeout=10).path == "/nowhere"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetAdapter(jobs_pb2.GetAdapterRequest(name="other"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_multi_gpu_job_records_the_torchrun_command_in_a_dry_run(jobs, worker_thread, tiny_csv: Path) -> None:
    _, stub = jobs
    w = worker_thread(dry_run=True, worker_id="dry", gpus=0)
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(name="multi", dataset_uri=str(tiny_csv), num_gpus=2, hyperparameters=hp()),
        timeout=30,
    )
    job = wait_job(stub, job.id, done, timeout=30)
    assert job.status == jobs_pb2.FAILED and job.error.code == "not_launched"
    expected = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "services.jobs.run_job",
        "--job-id",
        job.id,
        "--jobs-dir",
        str(w.settings.jobs_dir),
        "--owner",
        "dry",
    ]
    assert list(w.store.get(job.id).launch_command) == expected
    logs = [e.message for e in events(stub, job.id) if e.kind == jobs_pb2.JobEvent.LOG]
    assert any(" ".join(expected) in m and m.startswith("Dry run") for m in logs)


@pytest.mark.slow
def test_multi_gpu_job_trains_data_parallel_under_torchrun(jobs, worker_thread, tiny_csv: Path) -> None:
    """Two processes on the CPU (gloo) stand in for two GPUs: every rank trains, rank 0 reports."""
    _, stub = jobs
    w = worker_thread(worker_id="multi", gpus=2)
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(
            name="ddp", dataset_uri=str(tiny_csv), num_gpus=2, hyperparameters=hp(max_steps=4, batch_size=2)
        ),
        timeout=30,
    )
    job = wait_job(stub, job.id, done, timeout=300)
    assert job.status == jobs_pb2.SUCCEEDED, job.error.message
    logs = [e.message for e in events(stub, job.id) if e.kind == jobs_pb2.JobEvent.LOG]
    assert any(m.startswith("Launching:") and "torch.distributed.run" in m for m in logs), logs
    assert job.step == 4
    assert stub.GetAdapter(jobs_pb2.GetAdapterRequest(name="ddp"), timeout=10).path
    metrics = [
        json.loads(line) for line in (w.settings.jobs_dir / job.id / "metrics.jsonl").read_text().splitlines()
    ]
    start = next(m for m in metrics if m["event"] == "start")
    assert start["total_steps"] == 4 and sum(m["event"] == "start" for m in metrics) == 1  # rank 0 alone logs
