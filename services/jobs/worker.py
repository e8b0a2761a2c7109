"""``midasheng worker``: training workers that take jobs from the Redis jobs stream.

Delivery is at-least-once (consumer group ``trainers`` on ``mdl:jobs``). A worker that takes a
job holds its lease (``mdl:job:<id>:lease``) and, from a heartbeat thread, renews the lease and
re-claims the job's stream entry for itself, so the entry never looks idle while the job runs.
When the worker dies the heartbeat stops: the lease lapses after ``lease_ttl_ms`` and the entry
after ``claim_min_idle_ms``; another worker claims it (XAUTOCLAIM), takes the lease and resumes
from the last checkpoint in the shared ``--jobs-dir``. Every start counts as an attempt; a job
that used up ``max_attempts`` ends FAILED with the reason. Job writes are guarded by the lease,
so a stalled worker that lost its job cannot overwrite the new owner's progress.

Training workers and LM (captioning) workers are separate processes; see docs/jobs.md for how
to place them on GPUs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from services import config
from services.errors import CheckpointError, ConfigError, DatasetError, InvalidArgument
from services.jobs.model import Adapter, AlreadyExists, EventKind, Job, JobError, JobStatus
from services.jobs.store import JobDefaults, JobStore, WriteRefused
from services.jobs.validate import check_runnable, job_dir, local_path
from services.transport.keys import JOB_GROUP, JOBS_STREAM, TransportDefaults, job_lease_key
from services.transport.lease import Lease
from services.transport.streams import Consumer, Entry, StreamClient

log = logging.getLogger(__name__)
DEFAULT_CHECKPOINT_EVERY = 50  # steps, when the job does not choose
DEFAULT_METRICS_EVERY = 10  # steps averaged into one METRICS event
NO_RETRY = (DatasetError, CheckpointError, ConfigError, InvalidArgument, FileNotFoundError)


@dataclass(frozen=True)
class WorkerSettings:
    jobs_dir: Path  # shared by every worker: checkpoints live here so another worker can resume
    worker_id: str = field(default_factory=lambda: f"trainer-{uuid.uuid4().hex[:8]}")
    device: str = "auto"
    dry_run: bool = False  # multi-GPU jobs: record the torchrun command instead of running it
    gpus: int | None = None  # GPUs this worker may use; None = every visible one
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    metrics_every: int = DEFAULT_METRICS_EVERY
    defaults: JobDefaults = field(default_factory=JobDefaults)
    allow_hub: bool = False  # base models may be hub ids (downloaded by the worker)


def torchrun_command(job: Job, settings: WorkerSettings) -> list[str]:
    """The launch command of a multi-GPU job (Redis comes from $REDIS_URL, never the command line)."""
    # torchrun, run through this interpreter so it works without the venv's bin/ on PATH
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(job.spec.num_gpus),
        "-m",
        "services.jobs.run_job",
        "--job-id",
        job.id,
        "--jobs-dir",
        str(settings.jobs_dir),
        "--owner",
        settings.worker_id,
    ]


def train_config(job: Job, settings: WorkerSettings) -> Any:
    from services.training.train import config_from_args

    spec, hp = job.spec, job.spec.hyperparameters
    return config_from_args(
        data=local_path(spec.dataset_uri),
        out=job_dir(settings.jobs_dir, job.id),
        model=spec.base_model,
        method=spec.method,
        lora_rank=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        lora_targets=tuple(hp.lora_targets),
        merge=False,
        learning_rate=hp.learning_rate,
        warmup_steps=hp.warmup_steps,
        max_steps=hp.max_steps,
        epochs=float(hp.epochs),
        batch_size=hp.batch_size,
        grad_accum=hp.grad_accum,
        eval_every=hp.eval_every,
        eval_data=local_path(spec.eval_dataset_uri) if spec.eval_dataset_uri else None,
        checkpoint_every=hp.checkpoint_every or settings.checkpoint_every,
        resume=True,
        seed=spec.seed,
        on_bad_rows="skip",
        device=settings.device,
        log_every=1,
        progress=False,
    )


def error_for(exc: BaseException) -> JobError:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return JobError("out_of_memory", f"The device ran out of memory: {exc}".split("\n")[0])
    if isinstance(exc, DatasetError):
        return JobError("invalid_dataset", str(exc))
    if isinstance(exc, CheckpointError):
        return JobError("base_model_error", str(exc))
    if isinstance(exc, ConfigError | InvalidArgument):
        return JobError("invalid_hyperparameters", str(exc))
    return JobError("internal", f"{type(exc).__name__}: {exc}".split("\n")[0])


class EventForwarder:
    """Turns Trainer events into job events and job updates, written under the worker's lease."""

    def __init__(
        self, store: JobStore, job: Job, owner: str, metrics_every: int, lost: threading.Event
    ) -> None:
        self.store, self.job, self.owner = store, job, owner
        self.metrics_every, self.lost = metrics_every, lost
        self._losses: list[float] = []

    def _write(self, job: Job | None, kind: EventKind, message: str = "", **fields: Any) -> None:
        if job is not None:
            self.job = job
        try:
            self.store.write(
                job, self.store.event(self.job, kind, message, **fields), job_id=self.job.id, owner=self.owner
            )
        except WriteRefused:
            log.warning("job %s: lease lost; stopping", self.job.id)
            self.lost.set()  # should_stop fires before the next step

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        if kind == "start":
            job = self.job.evolve(total_steps=int(e["total_steps"]), step=int(e["step"]))
            self._write(
                job,
                EventKind.LOG,
                f"Training on {e['train_rows']} rows ({e['eval_rows']} held out), "
                f"{e['trainable_parameters']} trainable parameters, {e['total_steps']} steps.",
            )
        elif kind == "step":
            self._losses.append(float(e["loss"]))
            step = int(e["step"])
            if step % self.metrics_every == 0 or step >= self.job.total_steps:
                loss = sum(self._losses) / len(self._losses)
                self._losses.clear()
                job = self.job.evolve(step=step, loss=loss)
                self._write(
                    job,
                    EventKind.METRICS,
                    loss=loss,
                    learning_rate=float(e["lr"]),
                    eta_seconds=float(e.get("eta_seconds", 0.0)),
                )
        elif kind == "eval":
            scores = {
                k: float(v)
                for k, v in e.items()
                if k not in ("event", "step", "time", "final") and isinstance(v, int | float)
            }
            self._write(
                None,
                EventKind.EVAL,
                "Final evaluation." if e.get("final") else "",
                step=int(e["step"]),
                eval_scores=scores,
            )
        elif kind == "checkpoint":
            job = self.job.evolve(latest_checkpoint=str(e["path"]), step=int(e["step"]))
            self._write(job, EventKind.CHECKPOINT, checkpoint_path=str(e["path"]))
        elif kind == "resumed":
            job = self.job.evolve(step=int(e["step"]))
            self._write(
                job,
                EventKind.LOG,
                f"Resumed from the checkpoint at step {e['step']} ({e['path']}).",
                checkpoint_path=str(e["path"]),
            )
        elif kind == "bad_row":
            self._write(None, EventKind.LOG, f"Skipped row {e['row']}: {e['message']}.")


def run_training(
    store: JobStore,
    job: Job,
    settings: WorkerSettings,
    lost: threading.Event,
    stop_extra: Callable[[], str | None] = lambda: None,
) -> str:
    """Train ``job`` (already RUNNING under ``settings.worker_id``'s lease) and write its ending.

    Returns "done" (terminal status written: ack the entry), "retry" (attempt failed, retry later)
    or "abandon" (lease lost or worker stopping: leave the entry for another worker).
    """
    from services.training.train import Trainer

    owner = settings.worker_id
    fwd = EventForwarder(store, job, owner, settings.metrics_every, lost)
    reason: list[str] = []

    def should_stop() -> bool:
        why = "lease_lost" if lost.is_set() else stop_extra()
        if why is None and store.cancel_requested(job.id):
            why = "cancelled"
        if why is not None:
            reason.append(why)
        return why is not None

    try:
        result = Trainer(train_config(job, settings), on_event=fwd, should_stop=should_stop).train()
    except Exception as exc:  # every failure ends as an event; the worker lives on
        log.exception("job %s failed", job.id)
        return _failed(store, fwd.job, settings, error_for(exc), retry=not isinstance(exc, NO_RETRY))
    now = time.time()
    if result["status"] == "stopped":
        why = reason[-1] if reason else "cancelled"
        if why == "cancelled":
            done = fwd.job.evolve(status=JobStatus.CANCELLED, finished_at=now, step=int(result["step"]))
            msg = f"Cancelled at step {result['step']} by request; checkpoint kept at {result['checkpoint']}."
            return _final(store, done, msg, owner)
        if why == "shutdown":
            store.log(
                fwd.job,
                f"Worker {owner} is stopping; another worker will resume from step {result['step']}.",
                owner=owner,
            )
        return "abandon"
    job = fwd.job.evolve(step=int(result["step"]))
    if "adapter" in result:
        adapter = Adapter(
            name=job.spec.adapter_name,
            base_model=job.spec.base_model,
            path=str(result["adapter"]),
            metrics={k: float(v) for k, v in result.get("scores", {}).items()},
            job_id=job.id,
            created_at=now,
            lora_rank=job.spec.hyperparameters.lora_rank,
        )
        try:
            store.register_adapter(adapter)
        except AlreadyExists as exc:
            mine = store.get_adapter(adapter.name).job_id == job.id  # registered by an earlier attempt
            if not mine:
                return _failed(store, job, settings, JobError("adapter_name_taken", str(exc)), retry=False)
        done = job.evolve(status=JobStatus.SUCCEEDED, finished_at=now, adapter_name=adapter.name, error=None)
        return _final(
            store, done, f"Training finished at step {job.step}; adapter {adapter.name!r} registered.", owner
        )
    done = job.evolve(status=JobStatus.SUCCEEDED, finished_at=now, error=None)
    return _final(
        store, done, f"Training finished at step {job.step}; model saved to {result.get('model')}.", owner
    )


def _final(store: JobStore, job: Job, message: str, owner: str) -> str:
    try:
        store.write(
            job, store.event(job, EventKind.STATUS, message), owner=owner, allowed=(JobStatus.RUNNING,)
        )
    except WriteRefused as exc:
        return "done" if exc.reason == "status" else "abandon"
    return "done"


def _failed(store: JobStore, job: Job, settings: WorkerSettings, error: JobError, retry: bool) -> str:
    limit = settings.defaults.max_attempts
    if retry and job.attempts < limit:
        try:
            store.write(
                job.evolve(error=error),
                store.event(
                    job,
                    EventKind.LOG,
                    f"Attempt {job.attempts} of {limit} failed ({error.message}); it will be "
                    "retried from the last checkpoint.",
                ),
                owner=settings.worker_id,
            )
        except WriteRefused:
            return "abandon"
        return "retry"
    failed = job.evolve(status=JobStatus.FAILED, error=error, finished_at=time.time())
    return _final(store, failed, error.message, settings.worker_id)


class _Keeper(threading.Thread):
    """Renews the job lease and keeps the job's stream entry fresh (not idle) while the job runs."""

    def __init__(self, worker: TrainingWorker, job_id: str, entry_id: str) -> None:
        super().__init__(name=f"job-keeper-{job_id}", daemon=True)
        self.worker, self.key, self.entry_id = worker, job_lease_key(job_id), entry_id
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        w = self.worker
        d = w.settings.defaults
        last_ok = time.monotonic()
        while not self.done.wait(d.heartbeat_ms / 1000):
            try:
                if not w.lease.renew(self.key, w.settings.worker_id, d.lease_ttl_ms):
                    self.lost.set()
                    return
                # resets the entry's idle time (JUSTID: not counted as a delivery)
                w.client.xclaim(JOBS_STREAM, JOB_GROUP, w.settings.worker_id, 0, [self.entry_id], justid=True)
                last_ok = time.monotonic()
            except redis.RedisError as exc:
                log.warning("job lease renewal failed: %s", exc)
                if (time.monotonic() - last_ok) * 1000 >= d.lease_ttl_ms:
                    self.lost.set()
                    return


class TrainingWorker:
    """One training worker: one job at a time."""

    def __init__(self, redis_url: str, settings: WorkerSettings) -> None:
        d = settings.defaults
        self.redis_url = redis_url
        self.settings = settings
        self.store = JobStore.from_url(redis_url, d)
        self.client = self.store.client
        self.lease = Lease(self.client)
        transport = TransportDefaults(
            lease_ttl_ms=d.lease_ttl_ms,
            heartbeat_ms=d.heartbeat_ms,
            claim_min_idle_ms=d.claim_min_idle_ms,
            block_ms=d.block_ms,
            max_deliveries=d.max_attempts + 3,
        )  # attempts end a job first
        self.consumer = Consumer(
            StreamClient(self.client, transport),
            JOBS_STREAM,
            JOB_GROUP,
            settings.worker_id,
            transport,
            count=1,
        )
        self.stop_event = threading.Event()
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or self.stop_event
        self.stop_event = stop
        log.info("training worker %s waiting for jobs", self.settings.worker_id)
        while not stop.is_set():
            try:
                self.run_once()
            except redis.RedisError as exc:
                log.warning("Redis error: %s; retrying", exc)
                stop.wait(1.0)

    def run_once(self) -> bool:
        entries = self.consumer.poll()
        for entry in entries:
            self.handle(entry)
        return bool(entries)

    def handle(self, entry: Entry) -> None:
        job_id = entry.fields.get("job_id", b"").decode()
        if not job_id:
            self.consumer.fail(entry, "job entry without a job_id field", poison=True)
            return
        try:
            job = self.store.get(job_id)
        except Exception as exc:  # unknown or unreadable job: nothing to run
            self.consumer.fail(entry, f"job {job_id}: {exc}", poison=True)
            return
        if job.status.terminal:
            self.consumer.ack(entry)
            return
        key, owner = job_lease_key(job_id), self.settings.worker_id
        if not self.lease.acquire(key, owner, self.settings.defaults.lease_ttl_ms):
            return  # another worker is alive and runs it; its heartbeat re-claims the entry
        keeper = _Keeper(self, job_id, entry.id)
        try:
            outcome = self._start(self.store.get(job_id), entry, keeper)
        finally:
            keeper.done.set()
            if keeper.is_alive():
                keeper.join(timeout=5)
            self.lease.release(key, owner)
        if outcome == "done":
            self.consumer.ack(entry)

    def _start(self, job: Job, entry: Entry, keeper: _Keeper) -> str:
        owner, limit = self.settings.worker_id, self.settings.defaults.max_attempts
        if job.status.terminal:
            return "done"
        now = time.time()
        if self.store.cancel_requested(job.id):
            done = job.evolve(status=JobStatus.CANCELLED, finished_at=now)
            return _final_any(self.store, done, "Cancelled before training resumed.", owner)
        problem = check_runnable(job, self.settings.jobs_dir, self.settings.allow_hub)
        if problem is not None:  # a job document this service did not write, or no longer allows
            failed = job.evolve(status=JobStatus.FAILED, finished_at=now, error=problem)
            return _final_any(self.store, failed, f"Not run: {problem.message}", owner)
        if job.attempts >= limit:
            why = (
                job.error.message if job.error else "its worker stopped (killed or lost its lease) every time"
            )
            failed = job.evolve(
                status=JobStatus.FAILED,
                finished_at=now,
                error=JobError(
                    "too_many_attempts", f"Gave up after {job.attempts} attempts; last problem: {why}"
                ),
            )
            return _final_any(self.store, failed, failed.error.message if failed.error else "", owner)
        takeover = job.status == JobStatus.RUNNING
        attempt = job.attempts + 1
        running = job.evolve(
            status=JobStatus.RUNNING, attempts=attempt, worker=owner, started_at=job.started_at or now
        )
        if takeover and job.worker and job.worker != owner:
            msg = (
                f"Worker {owner} took over from worker {job.worker}, whose lease lapsed (attempt {attempt} of "
                f"{limit}); resuming from the last checkpoint."
            )
        elif takeover:
            msg = f"Worker {owner} retries the job (attempt {attempt} of {limit}) from the last checkpoint."
        else:
            msg = f"Worker {owner} started training (attempt {attempt} of {limit})."
        try:
            self.store.write(
                running,
                self.store.event(running, EventKind.STATUS, msg),
                owner=owner,
                allowed=(JobStatus.QUEUED, JobStatus.RUNNING),
            )
        except WriteRefused as exc:
            return "done" if exc.reason == "status" else "abandon"
        keeper.start()
        if job.spec.num_gpus > 1:
            return self._launch(running, keeper)

        def stop_extra() -> str | None:
            return "shutdown" if self.stop_event.is_set() else None

        return run_training(self.store, running, self.settings, keeper.lost, stop_extra)

    def _launch(self, job: Job, keeper: _Keeper) -> str:
        """Multi-GPU jobs run under torchrun; a dry run (or too few GPUs) records the command instead."""
        cmd = torchrun_command(job, self.settings)
        visible = self.settings.gpus if self.settings.gpus is not None else _visible_gpus()
        job = job.evolve(launch_command=tuple(cmd))
        text = shlex.join(cmd)
        if self.settings.dry_run or visible < job.spec.num_gpus:
            why = (
                "Dry run"
                if self.settings.dry_run
                else f"This worker has {visible} GPUs but the job asks for {job.spec.num_gpus}"
            )
            self.store.write(
                job,
                self.store.event(job, EventKind.LOG, f"{why}: launch command recorded, not run: {text}"),
                owner=self.settings.worker_id,
            )
            failed = job.evolve(
                status=JobStatus.FAILED,
                finished_at=time.time(),
                error=JobError("not_launched", f"{why}; the torchrun command was recorded, not run."),
            )
            return _final(
                self.store, failed, failed.error.message if failed.error else "", self.settings.worker_id
            )
        self.store.write(
            job, self.store.event(job, EventKind.LOG, f"Launching: {text}"), owner=self.settings.worker_id
        )
        env = {**os.environ, "REDIS_URL": self.redis_url}
        proc = subprocess.Popen(cmd, env=env)
        while proc.poll() is None:
            if keeper.lost.is_set() or self.stop_event.is_set():
                proc.terminate()  # rank 0 saves nothing on SIGTERM; the last checkpoint stands
                proc.wait(timeout=60)
                return "abandon"
            time.sleep(1.0)
        after = self.store.get(job.id)
        if after.status.terminal:
            return "done"
        return _failed(
            self.store,
            after,
            self.settings,
            JobError("internal", f"torchrun exited with code {proc.returncode} without finishing the job."),
            retry=True,
        )


def _final_any(store: JobStore, job: Job, message: str, owner: str) -> str:
    try:
        store.write(
            job,
            store.event(job, EventKind.STATUS, message),
            owner=owner,
            allowed=(JobStatus.QUEUED, JobStatus.RUNNING),
        )
    except WriteRefused as exc:
        return "done" if exc.reason == "status" else "abandon"
    return "done"


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
    p.add_argument(
        "--jobs-dir",
        type=Path,
        required=True,
        help="shared directory for checkpoints and results (every worker must see the same one)",
    )
    p.add_argument(
        "--worker-id", default=None, help="consumer name (default: random); reuse it after a restart"
    )
    p.add_argument("--device", default="auto", help="training device (default: cuda if available)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs this worker may use (default: all visible)")
    p.add_argument(
        "--dry-run", action="store_true", help="record multi-GPU torchrun commands instead of running"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        help="steps between checkpoints when a job does not choose (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-every",
        type=int,
        default=DEFAULT_METRICS_EVERY,
        help="steps averaged into one METRICS event (default: %(default)s)",
    )
    config.add_flags(p, JobDefaults)
    p.add_argument(
        "--allow-hub-downloads",
        action="store_true",
        help="run jobs whose base model is a hub id (downloaded by this worker; default: refused)",
    )


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    defaults = config.from_args(JobDefaults, args)
    kw: dict[str, Any] = {}
    if args.worker_id:
        kw["worker_id"] = args.worker_id
    return WorkerSettings(
        jobs_dir=args.jobs_dir,
        device=args.device,
        dry_run=args.dry_run,
        gpus=args.gpus,
        checkpoint_every=args.checkpoint_every,
        metrics_every=args.metrics_every,
        defaults=defaults,
        allow_hub=args.allow_hub_downloads,
        **kw,
    )
