"""H5: training workers trust nothing they read from shared storage or Redis. A checkpoint state
holding a pickle payload is refused (weights_only), not run; a job whose id is not one this
service made (a path, '..') ends FAILED with the reason before any directory is made; a base model
that would be downloaded from the hub is refused unless downloads are allowed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from services.errors import CheckpointError
from services.jobs.model import Job, JobSpec, JobStatus
from services.jobs.server import start_jobs_server
from services.jobs.validate import job_dir
from services.pb.midasheng.v1 import jobs_pb2, jobs_pb2_grpc
from services.training.train import STATE_FILE, Trainer, config_from_args
from services.transport.keys import JOBS_STREAM
from services.transport.streams import StreamClient
from tests.jobs.conftest import done, hp, wait_job


class Planted:
    """Runs ``touch MARKER`` when unpickled: what an attacker would plant in shared storage."""

    marker = ""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {Planted.marker}",))


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tiny_csv: Path, tmp_path: Path) -> None:
    cfg = dict(
        data=tiny_csv, out=tmp_path / "run", architecture="tiny", max_steps=2, batch_size=4,
        eval_fraction=0.1, eval_samples=2, checkpoint_every=1, progress=False, device="cpu", seed=1,
    )  # fmt: skip
    assert Trainer(config_from_args(**{**cfg, "max_steps": 1})).train()["step"] == 1  # type: ignore[arg-type]
    bad = tmp_path / "run" / "checkpoints" / "step-9999999"
    bad.mkdir()
    for f in (tmp_path / "run" / "checkpoints" / "step-0000001").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    Planted.marker = str(tmp_path / "pwned")
    torch.save({"step": Planted()}, bad / STATE_FILE)
    with pytest.raises(CheckpointError, match="not loaded"):
        Trainer(config_from_args(**cfg, resume=True)).train()  # type: ignore[arg-type]
    assert not Path(Planted.marker).exists()
    # A real checkpoint still resumes (its state is tensors and plain values).
    (bad / STATE_FILE).unlink()
    result = Trainer(config_from_args(**cfg, resume=True)).train()  # type: ignore[arg-type]
    assert result["status"] == "succeeded" and result["step"] == 2


@pytest.mark.parametrize(
    "bad_id", ["job-../../escape", "/tmp/midasheng-escape", "job-1234", "job-" + "g" * 20]
)
def test_job_ids_that_are_paths_never_become_directories(bad_id: str, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a job id"):
        job_dir(tmp_path, bad_id)
    assert job_dir(tmp_path, "job-0123456789abcdef0123") == (tmp_path / "job-0123456789abcdef0123").resolve()
    (tmp_path / "job-0123456789abcdef0123").symlink_to("/tmp")
    with pytest.raises(Exception, match="leads out"):
        job_dir(tmp_path, "job-0123456789abcdef0123")


def test_a_job_written_into_redis_with_a_path_for_an_id_ends_failed(
    jobs, worker_thread, tiny_csv: Path, tmp_path: Path
) -> None:
    srv, stub = jobs
    store = srv.api.store
    escape = tmp_path / "escaped"
    bad = Job(
        id=f"job-0/../../{escape.name}",
        spec=JobSpec(name="evil", dataset_uri=str(tiny_csv), base_model="demo"),
        status=JobStatus.QUEUED,
        created_at=time.time(),
    )
    store.create(bad, "planted")
    StreamClient(store.client).add(JOBS_STREAM, {"job_id": bad.id}, 100)
    worker_thread(jobs_dir=tmp_path / "jobs")
    got = wait_job(stub, bad.id, done, timeout=60)
    assert got.status == jobs_pb2.FAILED and got.error.code == "invalid_job", got
    assert "not a job id" in got.error.message
    assert not escape.exists() and not (tmp_path / "jobs" / "job-0").exists()


def test_hub_base_models_are_refused_unless_allowed(redis_url: str, tiny_csv: Path) -> None:
    for allow, expected in ((False, jobs_pb2.FAILED), (True, jobs_pb2.QUEUED)):
        srv = start_jobs_server(redis_url, allow_hub=allow)
        try:
            import grpc

            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                job = jobs_pb2_grpc.JobServiceStub(ch).CreateJob(
                    jobs_pb2.CreateJobRequest(
                        name=f"hub{int(allow)}", dataset_uri=str(tiny_csv), base_model="someone/some-model",
                        hyperparameters=hp(max_steps=1),
                    ),
                    timeout=30,
                )  # fmt: skip
            assert job.status == expected, job
            if not allow:
                assert job.error.code == "hub_download_not_allowed"
        finally:
            srv.stop(0.5)
