"""The jobs API as plain Python: create (validate, then queue), get, list, cancel, events, adapters.

The gRPC servicer (:mod:`services.jobs.server`) only converts messages to and from these calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

from services.jobs.model import (
    Adapter,
    AlreadyExists,
    EventKind,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobStatus,
)
from services.jobs.store import JobStore
from services.jobs.validate import Validation, validate_job
from services.transport.keys import JOBS_STREAM
from services.transport.streams import StreamClient

log = logging.getLogger(__name__)

FOLLOW_LIMIT_S = 24 * 3600.0  # a followed event stream ends after this long, whatever happens


class JobsAPI:
    def __init__(self, store: JobStore, default_base_model: str = "demo", allow_hub: bool = False) -> None:
        self.store = store
        self.default_base_model = default_base_model
        self.allow_hub = allow_hub  # base models may be hub ids
        self.streams = StreamClient(store.client)

    def create(self, spec: JobSpec) -> Job:
        """Validate the request (InvalidArgument), then the dataset (a FAILED job), then queue it."""
        if not spec.base_model:
            spec = replace(spec, base_model=self.default_base_model)
        spec.validate()
        if spec.adapter_name and self.store.adapter_exists(spec.adapter_name):
            raise AlreadyExists(
                f"An adapter named {spec.adapter_name!r} already exists; choose another "
                "adapter_name (or job name)."
            )
        from services.jobs.store import new_job_id

        job = Job(id=new_job_id(), spec=spec, status=JobStatus.VALIDATING, created_at=time.time())
        self.store.create(job, "Job created; validating the dataset and base model.")
        try:
            result = validate_job(spec, self.allow_hub)
        except Exception:  # whatever happens, the job must not stay VALIDATING for ever
            log.exception("validating job %s failed", job.id)
            result = Validation(JobError("internal", "Validating the job failed; see the jobs service log."))
        if result.error is not None:
            failed = job.evolve(
                status=JobStatus.FAILED, error=result.error, problems=result.problems, finished_at=time.time()
            )
            self.store.write(failed, self.store.event(failed, EventKind.STATUS, result.error.message))
            return failed
        queued = job.evolve(status=JobStatus.QUEUED)
        self.store.write(
            queued,
            self.store.event(
                queued,
                EventKind.STATUS,
                f"Validated {result.rows} training rows; waiting for a training worker.",
            ),
            allowed=(JobStatus.VALIDATING,),
        )
        self.streams.add(
            JOBS_STREAM, {"job_id": job.id}, self.store.defaults.jobs_stream_maxlen, counter="jobs"
        )
        return self.store.get(job.id)

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list_jobs(
        self, page_size: int = 0, page_token: str = "", statuses: tuple[JobStatus, ...] = ()
    ) -> tuple[list[Job], str]:
        return self.store.list_jobs(page_size, page_token, statuses)

    def cancel(self, job_id: str) -> Job:
        return self.store.request_cancel(job_id)

    def events(
        self, job_id: str, after: int = 0, follow: bool = False, is_active: object = None
    ) -> Iterator[JobEvent]:
        """Stored events after ``after``; with ``follow`` also live ones until the job finishes.

        ``is_active`` (a callable) is polled between waits so a departed client ends the loop.
        """
        job = self.store.get(job_id)  # NotFound for an unknown id
        last = after
        for ev in self.store.events(job_id, after):
            last = ev.event_id
            yield ev
        if not follow:
            return
        deadline = time.monotonic() + FOLLOW_LIMIT_S
        while time.monotonic() < deadline:
            if callable(is_active) and not is_active():
                return
            batch = self.store.wait_events(job_id, last)
            for ev in batch:
                last = ev.event_id
                yield ev
            if not batch:
                job = self.store.get(job_id)
                if job.status.terminal:
                    # the terminal status event is written with the status: drain and stop
                    for ev in self.store.events(job_id, last):
                        last = ev.event_id
                        yield ev
                    return

    def adapters(
        self, page_size: int = 0, page_token: str = "", base_model: str = ""
    ) -> tuple[list[Adapter], str]:
        return self.store.list_adapters(page_size, page_token, base_model)

    def adapter(self, name: str) -> Adapter:
        return self.store.get_adapter(name)
