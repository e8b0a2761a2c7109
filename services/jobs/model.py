"""Fine-tuning jobs as plain data: statuses, the request (spec), the job record, events, adapters.

Everything here is a frozen dataclass validated in one place and stored in Redis as JSON. The
hyperparameter defaults are the training pipeline's (:class:`services.training.train.TrainConfig`),
so a job and ``midasheng train`` with the same data and no options train the same model.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from services.errors import InvalidArgument, MidashengError
from services.model.adapters import DECODER_LORA_TARGETS
from services.training.train import TrainConfig

_TRAIN = TrainConfig(data=None, out=None)  # type: ignore[arg-type]  # only read for its defaults
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
METHODS = ("lora", "full")
MAX_GPUS = 64
MAX_LORA_TARGETS = 64
MAX_PROBLEMS = 100  # dataset problems kept on a job


class AlreadyExists(MidashengError):
    """A name is taken (an adapter name); the gRPC layer answers ALREADY_EXISTS."""


class JobStatus(StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class EventKind(StrEnum):
    STATUS = "status"  # the status changed
    METRICS = "metrics"  # step, loss (mean since the previous METRICS event), lr, eta
    EVAL = "eval"  # step, eval scores
    CHECKPOINT = "checkpoint"  # step, checkpoint path
    LOG = "log"  # message


@dataclass(frozen=True)
class Hyperparameters:
    """Training settings; every default is the training pipeline's."""

    learning_rate: float = _TRAIN.learning_rate
    epochs: int = 1
    max_steps: int | None = None  # None = epochs decide
    batch_size: int = _TRAIN.batch_size
    grad_accum: int = _TRAIN.grad_accum
    warmup_steps: int = _TRAIN.warmup_steps
    lora_rank: int = _TRAIN.lora_rank
    lora_alpha: float = _TRAIN.lora_alpha
    lora_dropout: float = _TRAIN.lora_dropout
    # Decoder projections: the part of an adapter that live streams apply (docs/jobs.md).
    lora_targets: tuple[str, ...] = DECODER_LORA_TARGETS
    eval_every: int = 0  # steps; 0 = only at the end
    checkpoint_every: int = 0  # steps; 0 = the worker's default

    def problems(self) -> list[str]:
        out: list[str] = []
        if not 0 < self.learning_rate <= 1:
            out.append(f"learning_rate must be within (0, 1], got {self.learning_rate}.")
        if not 1 <= self.epochs <= 1000:
            out.append(f"epochs must be within [1, 1000], got {self.epochs}.")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"max_steps must be at least 1 when set, got {self.max_steps}.")
        for name in ("batch_size", "grad_accum"):
            if not 1 <= getattr(self, name) <= 1024:
                out.append(f"{name} must be within [1, 1024], got {getattr(self, name)}.")
        if not 1 <= self.lora_rank <= 512:
            out.append(f"lora_rank must be within [1, 512], got {self.lora_rank}.")
        if not 0 < self.lora_alpha <= 4096:
            out.append(f"lora_alpha must be within (0, 4096], got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout must be within [0, 1), got {self.lora_dropout}.")
        if not self.lora_targets or len(self.lora_targets) > MAX_LORA_TARGETS:
            out.append(f"lora_targets must name 1 to {MAX_LORA_TARGETS} module patterns.")
        elif any(not t or any(c.isspace() for c in t) for t in self.lora_targets):
            out.append("lora_targets must be non-empty module name patterns without spaces.")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                out.append(f"{name} must not be negative, got {getattr(self, name)}.")
        return out


@dataclass(frozen=True)
class JobSpec:
    """What a client asked for, with every default filled in."""

    name: str
    dataset_uri: str
    base_model: str
    eval_dataset_uri: str = ""
    method: str = "lora"
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    seed: int = 0
    num_gpus: int = 1
    adapter_name: str = ""  # "" = name (LoRA); always "" for full fine-tuning

    def __post_init__(self) -> None:
        if self.method == "lora" and not self.adapter_name:
            object.__setattr__(self, "adapter_name", self.name)

    def validate(self) -> None:
        """Raise InvalidArgument listing every problem, each a plain sentence."""
        out: list[str] = []
        if not NAME_RE.match(self.name or ""):
            out.append(f"name must be 1 to 64 characters of [A-Za-z0-9._-], got {self.name!r}.")
        if self.adapter_name and not NAME_RE.match(self.adapter_name):
            out.append(
                f"adapter_name must be 1 to 64 characters of [A-Za-z0-9._-], got {self.adapter_name!r}."
            )
        if not self.dataset_uri:
            out.append("dataset_uri is required.")
        if not self.base_model:
            out.append("base_model is required (the server fills in its own model when it has one).")
        if self.method not in METHODS:
            out.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if not 1 <= self.num_gpus <= MAX_GPUS:
            out.append(f"num_gpus must be within [1, {MAX_GPUS}], got {self.num_gpus}.")
        if not 0 <= self.seed < 2**64:
            out.append(f"seed must be an unsigned 64-bit integer, got {self.seed}.")
        out += self.hyperparameters.problems()
        if out:
            raise InvalidArgument(" ".join(out))


@dataclass(frozen=True)
class JobError:
    code: str  # lower_snake_case, e.g. "invalid_dataset"
    message: str  # one sentence
    row: int = 0  # 1-based CSV data row; 0 = not tied to a row


@dataclass(frozen=True)
class Job:
    id: str
    spec: JobSpec
    status: JobStatus
    created_at: float
    started_at: float = 0.0
    finished_at: float = 0.0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    error: JobError | None = None
    problems: tuple[JobError, ...] = ()
    adapter_name: str = ""  # set once SUCCEEDED
    latest_checkpoint: str = ""
    attempts: int = 0  # training attempts started (a takeover counts as one)
    worker: str = ""  # worker that runs or ran it
    launch_command: tuple[str, ...] = ()  # torchrun command of a multi-GPU job

    @property
    def name(self) -> str:
        return self.spec.name

    def evolve(self, **changes: Any) -> Job:
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        d = json.loads(text)
        spec = d.pop("spec")
        hp = spec.pop("hyperparameters")
        hp["lora_targets"] = tuple(hp["lora_targets"])
        d["spec"] = JobSpec(hyperparameters=Hyperparameters(**hp), **spec)
        d["status"] = JobStatus(d["status"])
        d["error"] = JobError(**d["error"]) if d.get("error") else None
        d["problems"] = tuple(JobError(**p) for p in d.get("problems", ()))
        d["launch_command"] = tuple(d.get("launch_command", ()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    kind: EventKind
    status: JobStatus
    event_id: int = 0  # assigned by the store: 1, 2, 3, ...
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    learning_rate: float = 0.0
    eval_scores: dict[str, float] = field(default_factory=dict)
    eta_seconds: float = 0.0
    checkpoint_path: str = ""
    message: str = ""
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, event_id: int) -> JobEvent:
        d = json.loads(text)
        d["kind"], d["status"], d["event_id"] = EventKind(d["kind"]), JobStatus(d["status"]), event_id
        return cls(**d)


@dataclass(frozen=True)
class Adapter:
    name: str
    base_model: str
    path: str  # peft directory (adapter_config.json + adapter_model.safetensors)
    metrics: dict[str, float] = field(default_factory=dict)
    job_id: str = ""
    created_at: float = 0.0
    lora_rank: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Adapter:
        return cls(**json.loads(text))
