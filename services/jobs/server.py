"""gRPC JobService: a thin translator between jobs.proto messages and :class:`services.jobs.api.JobsAPI`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from services import rpc
from services.jobs.api import JobsAPI
from services.jobs.model import (
    Adapter,
    AlreadyExists,
    EventKind,
    Hyperparameters,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobStatus,
)
from services.jobs.store import JobDefaults, JobStore
from services.pb.midasheng.v1 import jobs_pb2, jobs_pb2_grpc
from services.security import JOBS, ServerSecurity

log = logging.getLogger(__name__)
SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
_DEFAULT_HP = Hyperparameters()
_METHOD_TO_PB = {"lora": jobs_pb2.LORA, "full": jobs_pb2.FULL}
_STATUS_TO_PB = {s: jobs_pb2.JobStatus.Value(s.value.upper()) for s in JobStatus}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
_KIND_TO_PB = {k: jobs_pb2.JobEvent.Kind.Value(k.value.upper()) for k in EventKind}


# --- proto -> domain ------------------------------------------------------------------------


def hyperparameters_from_pb(pb: jobs_pb2.Hyperparameters) -> Hyperparameters:
    d = _DEFAULT_HP
    return Hyperparameters(
        learning_rate=pb.learning_rate or d.learning_rate,
        epochs=pb.epochs or d.epochs,
        max_steps=pb.max_steps or None,
        batch_size=pb.batch_size or d.batch_size,
        grad_accum=pb.grad_accum or d.grad_accum,
        warmup_steps=pb.warmup_steps or d.warmup_steps,
        lora_rank=pb.lora_rank or d.lora_rank,
        lora_alpha=pb.lora_alpha or d.lora_alpha,
        lora_dropout=pb.lora_dropout if pb.HasField("lora_dropout") else d.lora_dropout,
        lora_targets=tuple(pb.lora_targets) or d.lora_targets,
        eval_every=pb.eval_every,
        checkpoint_every=pb.checkpoint_every,
    )


def spec_from_pb(pb: jobs_pb2.CreateJobRequest) -> JobSpec:
    method = "full" if pb.method == jobs_pb2.FULL else "lora"
    return JobSpec(
        name=pb.name,
        dataset_uri=pb.dataset_uri,
        eval_dataset_uri=pb.eval_dataset_uri,
        base_model=pb.base_model,
        method=method,
        hyperparameters=hyperparameters_from_pb(pb.hyperparameters),
        seed=pb.seed,
        num_gpus=pb.num_gpus or 1,
        adapter_name=pb.adapter_name,
    )


# --- domain -> proto ------------------------------------------------------------------------


def spec_to_pb(s: JobSpec) -> jobs_pb2.CreateJobRequest:
    hp = s.hyperparameters
    return jobs_pb2.CreateJobRequest(
        name=s.name,
        dataset_uri=s.dataset_uri,
        eval_dataset_uri=s.eval_dataset_uri,
        base_model=s.base_model,
        method=_METHOD_TO_PB[s.method],
        seed=s.seed,
        num_gpus=s.num_gpus,
        adapter_name=s.adapter_name,
        hyperparameters=jobs_pb2.Hyperparameters(
            learning_rate=hp.learning_rate,
            epochs=hp.epochs,
            max_steps=hp.max_steps or 0,
            batch_size=hp.batch_size,
            grad_accum=hp.grad_accum,
            warmup_steps=hp.warmup_steps,
            lora_rank=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            lora_targets=list(hp.lora_targets),
            eval_every=hp.eval_every,
            checkpoint_every=hp.checkpoint_every,
        ),
    )


def error_to_pb(e: JobError) -> jobs_pb2.JobError:
    return jobs_pb2.JobError(code=e.code, message=e.message, row=e.row)


def job_to_pb(j: Job) -> jobs_pb2.Job:
    pb = jobs_pb2.Job(
        id=j.id,
        name=j.name,
        status=_STATUS_TO_PB[j.status],
        request=spec_to_pb(j.spec),
        created_at_unix_seconds=j.created_at,
        started_at_unix_seconds=j.started_at,
        finished_at_unix_seconds=j.finished_at,
        step=j.step,
        total_steps=j.total_steps,
        loss=j.loss,
        problems=[error_to_pb(p) for p in j.problems],
        adapter_name=j.adapter_name,
        latest_checkpoint_path=j.latest_checkpoint,
    )
    if j.error is not None and j.status == JobStatus.FAILED:
        pb.error.CopyFrom(error_to_pb(j.error))
    return pb


def event_to_pb(e: JobEvent) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(
        job_id=e.job_id,
        event_id=e.event_id,
        kind=_KIND_TO_PB[e.kind],
        status=_STATUS_TO_PB[e.status],
        step=e.step,
        total_steps=e.total_steps,
        loss=e.loss,
        learning_rate=e.learning_rate,
        eval_scores=e.eval_scores,
        eta_seconds=e.eta_seconds,
        checkpoint_path=e.checkpoint_path,
        message=e.message,
        created_at_unix_seconds=e.created_at,
    )


def adapter_to_pb(a: Adapter) -> jobs_pb2.Adapter:
    return jobs_pb2.Adapter(
        name=a.name,
        base_model=a.base_model,
        path=a.path,
        metrics=a.metrics,
        job_id=a.job_id,
        created_at_unix_seconds=a.created_at,
        lora_rank=a.lora_rank,
    )


def _already_exists(fn: Callable[..., Any]) -> Callable[..., Any]:
    """ALREADY_EXISTS for a taken name (set on the context: rpc.unary would remap an abort)."""

    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except AlreadyExists as e:
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            context.set_details(str(e))
            return jobs_pb2.Job()

    return wrapper


@dataclass
class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    api: JobsAPI

    @rpc.unary
    @_already_exists
    def CreateJob(self, request: jobs_pb2.CreateJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return job_to_pb(self.api.create(spec_from_pb(request)))

    @rpc.unary
    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return job_to_pb(self.api.get(request.job_id))

    @rpc.unary
    def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        statuses = tuple(_STATUS_FROM_PB[s] for s in request.statuses if s in _STATUS_FROM_PB)
        if request.statuses and not statuses:
            return jobs_pb2.ListJobsResponse()  # only JOB_STATUS_UNSPECIFIED: matches nothing
        jobs, token = self.api.list_jobs(request.page_size, request.page_token, statuses)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    @rpc.unary
    def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return job_to_pb(self.api.cancel(request.job_id))

    @rpc.streaming
    def StreamJobEvents(
        self, request: jobs_pb2.JobEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.JobEvent]:
        for ev in self.api.events(request.job_id, request.after_event_id, request.follow, context.is_active):
            yield event_to_pb(ev)

    @rpc.unary
    def ListAdapters(
        self, request: jobs_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListAdaptersResponse:
        adapters, token = self.api.adapters(request.page_size, request.page_token, request.base_model)
        return jobs_pb2.ListAdaptersResponse(
            adapters=[adapter_to_pb(a) for a in adapters], next_page_token=token
        )

    @rpc.unary
    def GetAdapter(
        self, request: jobs_pb2.GetAdapterRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Adapter:
        return adapter_to_pb(self.api.adapter(request.name))


@dataclass
class JobsServer:
    server: grpc.Server
    port: int
    api: JobsAPI

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait(grace + 1)
        self.api.store.close()


def start_jobs_server(
    redis_url: str,
    address: str = "127.0.0.1:0",
    jobs_dir: str | None = None,
    base_model: str = "demo",
    defaults: JobDefaults | None = None,
    security: ServerSecurity | None = None,
    allow_hub: bool = False,
) -> JobsServer:
    """Serve JobService (plus health and reflection). ``jobs_dir`` is where workers write; the server
    itself only reads Redis, so it is informational here."""
    api = JobsAPI(JobStore.from_url(redis_url, defaults), default_base_model=base_model, allow_hub=allow_hub)
    security = security or ServerSecurity()
    server = rpc.make_server(interceptors=security.interceptors(default_scope=JOBS))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(api), server)
    rpc.add_health_and_reflection(server, [SERVICE])
    port = rpc.bind(server, address, security.credentials)
    server.start()
    log.info("job service listening on port %d (jobs dir %s)", port, jobs_dir or "-")
    return JobsServer(server, port, api)
