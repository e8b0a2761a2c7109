"""Checks a job before it is queued, so a bad dataset or a missing model costs no GPU time.

Problems come back as :class:`JobError` values with 1-based CSV data rows (header excluded),
exactly the rows ``services.training.data.read_dataset`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from services.errors import DatasetError
from services.jobs.model import MAX_PROBLEMS, JobError, JobSpec
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


def check_base_model(base_model: str) -> JobError | None:
    """A local base model must be a directory holding config.json; hub ids are fetched by the worker."""
    if base_model == "demo":
        return None
    path = Path(base_model).expanduser()
    looks_local = base_model.startswith((".", "/", "~")) or base_model.count("/") != 1 or path.exists()
    if not looks_local:
        return None
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
    return Validation(None, rows=len(rows))


def validate_job(spec: JobSpec) -> Validation:
    """Base model first (cheap), then the training and held-out datasets."""
    error = check_base_model(spec.base_model)
    if error is not None:
        return Validation(error)
    result = check_dataset(spec.dataset_uri)
    if result.error is None and spec.eval_dataset_uri:
        held = check_dataset(spec.eval_dataset_uri, "held-out dataset")
        if held.error is not None:
            return held
    return result
