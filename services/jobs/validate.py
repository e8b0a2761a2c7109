"""Checks a job before it is queued, so a bad dataset or a missing model costs no GPU time.

Problems come back as :class:`JobError` values with 1-based CSV data rows (header excluded),
exactly the rows ``services.training.data.read_dataset`` reports.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from services.errors import DatasetError, InvalidArgument
from services.jobs.model import MAX_PROBLEMS, NAME_RE, Job, JobError, JobSpec
from services.model.checkpoint import CONFIG_NAME
from services.training.data import read_dataset


@dataclass(frozen=True)
class Validation:
    error: JobError | None  # why the job cannot run; None = it can
    problems: tuple[JobError, ...] = ()  # per-row dataset problems (at most MAX_PROBLEMS)
    rows: int = 0  # usable training rows


def local_path(uri: str) -> Path:
    """A dataset URI as a local path: plain paths and ``file://`` URIs; others are refused."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if "://" in uri:
        raise ValueError(
            f"{uri} is not a local path; this deployment reads datasets from local paths or "
            "file:// URIs on storage the workers share."
        )
    return Path(uri).expanduser()


def _problem_code(message: str) -> str:
    if "empty prediction" in message:
        return "empty_prediction"
    if "empty audio path" in message:
        return "empty_audio_path"
    if "does not exist" in message:
        return "audio_not_found"
    return "audio_decode_error"


JOB_ID_RE = re.compile(r"^job-[0-9a-f]{20}$")  # what store.new_job_id makes, nothing else


def job_dir(jobs_dir: Path, job_id: str) -> Path:
    """``jobs_dir/<job id>`` for a job id this service made: one plain name (no '/', no '..', not
    absolute), and the resolved directory inside ``jobs_dir`` (no symlink out of it)."""
    if not JOB_ID_RE.match(job_id):
        raise InvalidArgument(f"{job_id!r} is not a job id this service made")
    root = jobs_dir.resolve()
    out = (root / job_id).resolve()
    if not out.is_relative_to(root) or out == root:
        raise InvalidArgument(f"the directory of job {job_id} leads out of the jobs directory")
    return out


def is_hub_id(base_model: str) -> bool:
    """``owner/repo`` that is not a local path: a model the worker would download from the hub."""
    path = Path(base_model).expanduser()
    return not (base_model.startswith((".", "/", "~")) or base_model.count("/") != 1 or path.exists())


def check_base_model(base_model: str, allow_hub: bool = False) -> JobError | None:
    """A local base model must be a directory holding config.json; hub ids are fetched by the worker,
    and only where hub downloads are allowed (``--allow-hub-downloads``)."""
    if base_model == "demo":
        return None
    path = Path(base_model).expanduser()
    if is_hub_id(base_model):
        if allow_hub:
            return None
        return JobError(
            "hub_download_not_allowed",
            f"Base model {base_model} would be downloaded from the hub, which this service does not "
            "allow; use a local checkpoint directory (or start the jobs service and workers with "
            "--allow-hub-downloads).",
        )
    if not path.is_dir():
        return JobError(
            "base_model_not_found", f"Base model {base_model} does not exist (no such directory)."
        )
    if not (path / CONFIG_NAME).is_file():
        return JobError(
            "base_model_not_found",
            f"Base model {base_model} is not a checkpoint directory (it has no {CONFIG_NAME}).",
        )
    return None


def check_dataset(uri: str, which: str = "dataset") -> Validation:
    try:
        path = local_path(uri)
    except ValueError as e:
        return Validation(JobError("unsupported_uri", str(e)))
    try:
        rows, _ = read_dataset(path, on_error="fail")
    except DatasetError as e:
        problems = tuple(
            JobError(_problem_code(msg), f"Row {row}: {msg}.", row) for row, msg in e.problems[:MAX_PROBLEMS]
        )
        if not e.problems:
            return Validation(JobError("invalid_dataset", str(e)))
        rows_bad = sorted({row for row, _ in e.problems})
        listed = ", ".join(str(r) for r in rows_bad[:10]) + (" ..." if len(rows_bad) > 10 else "")
        message = f"The {which} {uri} has {len(rows_bad)} bad rows ({listed}); see problems."
        return Validation(JobError("invalid_dataset", message), problems)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:  # binary, unreadable, huge field
        return Validation(
            JobError(
                "invalid_dataset", f"The {which} {uri} cannot be read as a UTF-8 CSV ({type(e).__name__})."
            )
        )
    return Validation(None, rows=len(rows))


def check_runnable(job: Job, jobs_dir: Path, allow_hub: bool = False) -> JobError | None:
    """What a training worker checks of a job it took from Redis before it touches any path:
    a job id it can make a directory of, plain names, an allowed base model."""
    try:
        job_dir(jobs_dir, job.id)
    except InvalidArgument as e:
        return JobError("invalid_job", str(e))
    for what, name in (("name", job.spec.name), ("adapter_name", job.spec.adapter_name)):
        if name and (not NAME_RE.match(name) or ".." in name):
            return JobError("invalid_job", f"{what} {name!r} is not a plain name")
    return check_base_model(job.spec.base_model, allow_hub)


def validate_job(spec: JobSpec, allow_hub: bool = False) -> Validation:
    """Base model first (cheap), then the training and held-out datasets."""
    error = check_base_model(spec.base_model, allow_hub)
    if error is not None:
        return Validation(error)
    result = check_dataset(spec.dataset_uri)
    if result.error is None and spec.eval_dataset_uri:
        held = check_dataset(spec.eval_dataset_uri, "held-out dataset")
        if held.error is not None:
            return held
    return result
