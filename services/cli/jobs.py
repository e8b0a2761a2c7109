"""``midasheng jobs ...`` (client and server of the jobs API) and ``midasheng worker`` (a training worker)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from services import config
from services.cli.common import add_client_flags, add_security_flags, client_from, security_from
from services.jobs.store import JobDefaults
from services.pb.midasheng.v1 import jobs_pb2, jobs_pb2_grpc

RPC_TIMEOUT_S = 60.0
TERMINAL = {jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED}


def _print(msg: object) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)), flush=True)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, jobs_pb2_grpc.JobServiceStub]:
    channel = client_from(args).channel(args.server)
    return channel, jobs_pb2_grpc.JobServiceStub(channel)


def create_request(args: argparse.Namespace) -> jobs_pb2.CreateJobRequest:
    hp = jobs_pb2.Hyperparameters(
        learning_rate=args.lr or 0.0,
        epochs=args.epochs or 0,
        max_steps=args.max_steps or 0,
        batch_size=args.batch_size or 0,
        grad_accum=args.grad_accum or 0,
        warmup_steps=args.warmup_steps or 0,
        lora_rank=args.lora_rank or 0,
        lora_alpha=args.lora_alpha or 0.0,
        lora_targets=[t for t in (args.lora_targets or "").split(",") if t],
        eval_every=args.eval_every or 0,
        checkpoint_every=args.checkpoint_every or 0,
    )
    if args.lora_dropout is not None:
        hp.lora_dropout = args.lora_dropout
    return jobs_pb2.CreateJobRequest(
        name=args.name,
        dataset_uri=str(args.data),
        eval_dataset_uri=str(args.eval_data or ""),
        base_model=args.base_model or "",
        method=jobs_pb2.FULL if args.method == "full" else jobs_pb2.LORA,
        hyperparameters=hp,
        seed=args.seed,
        num_gpus=args.num_gpus,
        adapter_name=args.adapter_name or "",
    )


def run_client(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    try:
        with channel:
            return _client(args, stub)
    except grpc.RpcError as e:
        print(f"midasheng jobs {args.action}: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace, stub: jobs_pb2_grpc.JobServiceStub) -> int:
    t = RPC_TIMEOUT_S
    if args.action == "create":
        _print(stub.CreateJob(create_request(args), timeout=t))
    elif args.action == "get":
        _print(stub.GetJob(jobs_pb2.GetJobRequest(job_id=args.job_id), timeout=t))
    elif args.action == "list":
        statuses = [jobs_pb2.JobStatus.Value(s.upper()) for s in args.status]
        _print(
            stub.ListJobs(
                jobs_pb2.ListJobsRequest(
                    page_size=args.page_size, page_token=args.page_token, statuses=statuses
                ),
                timeout=t,
            )
        )
    elif args.action == "cancel":
        _print(stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=args.job_id), timeout=t))
    elif args.action == "events":
        req = jobs_pb2.JobEventsRequest(job_id=args.job_id, after_event_id=args.after, follow=args.follow)
        for ev in stub.StreamJobEvents(req, timeout=args.timeout):
            _print(ev)
    elif args.action == "wait":
        deadline = time.monotonic() + args.timeout
        while True:
            job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=args.job_id), timeout=t)
            if job.status in TERMINAL:
                _print(job)
                return 0 if job.status == jobs_pb2.SUCCEEDED else 1
            if time.monotonic() > deadline:
                print(
                    f"midasheng jobs wait: still {jobs_pb2.JobStatus.Name(job.status)} after {args.timeout:.0f} s",
                    file=sys.stderr,
                )
                return 3
            time.sleep(args.poll)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from services.jobs.server import start_jobs_server
    from services.runtime import redis_url_from, wait_for_shutdown
    from services.security import server_security

    security = server_security(security_from(args), args.api_keys_file)
    srv = start_jobs_server(
        redis_url_from(args.redis_url),
        args.listen,
        args.jobs_dir,
        args.base_model,
        defaults=config.from_args(JobDefaults, args),
        security=security,
        allow_hub=args.allow_hub_downloads,
    )
    print(f"jobs ready on port {srv.port}", flush=True)
    return wait_for_shutdown(srv.stop)


def run_worker(args: argparse.Namespace) -> int:
    import signal

    from services.jobs.worker import TrainingWorker, settings_from_args
    from services.runtime import redis_url_from

    worker = TrainingWorker(redis_url_from(args.redis_url), settings_from_args(args))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"worker {worker.settings.worker_id} ready", flush=True)
    worker.run(stop)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from services.jobs.worker import add_arguments

    p = sub.add_parser(
        "jobs",
        help="fine-tuning jobs: create, watch, cancel; serve the jobs API",
        description="Client of the JobService (--server), or `serve` to run it.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    def client(name: str, help_: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_)
        a.add_argument(
            "--server", default="127.0.0.1:50071", help="jobs API address (default: 127.0.0.1:50071)"
        )
        add_client_flags(a)
        a.set_defaults(func=run_client)
        return a

    c = client("create", "validate a dataset and queue a fine-tuning job")
    c.add_argument("--name", required=True, help="job name, also the adapter name")
    c.add_argument("--data", required=True, help="training CSV (audio,system_prompt,user_prompt,prediction)")
    c.add_argument("--eval-data", default=None, help="held-out CSV (default: 5%% of the training rows)")
    c.add_argument("--base-model", default=None, help="base checkpoint (default: the server's)")
    c.add_argument("--method", choices=["lora", "full"], default="lora")
    c.add_argument("--adapter-name", default=None)
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--epochs", type=int, default=None)
    c.add_argument("--max-steps", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--grad-accum", type=int, default=None)
    c.add_argument("--warmup-steps", type=int, default=None)
    c.add_argument("--lora-rank", type=int, default=None)
    c.add_argument("--lora-alpha", type=float, default=None)
    c.add_argument("--lora-dropout", type=float, default=None)
    c.add_argument("--lora-targets", default=None, help="comma-separated module patterns")
    c.add_argument("--eval-every", type=int, default=None)
    c.add_argument("--checkpoint-every", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--num-gpus", type=int, default=1)
    for name, help_ in (("get", "show one job"), ("cancel", "cancel a job")):
        client(name, help_).add_argument("job_id", metavar="JOB_ID")
    li = client("list", "list jobs, newest first")
    li.add_argument("--page-size", type=int, default=20)
    li.add_argument("--page-token", default="")
    li.add_argument(
        "--status",
        action="append",
        default=[],
        choices=["validating", "queued", "running", "succeeded", "failed", "cancelled"],
    )
    ev = client("events", "print a job's events (one JSON object a line)")
    ev.add_argument("job_id", metavar="JOB_ID")
    ev.add_argument("--after", type=int, default=0, help="only events after this event id")
    ev.add_argument("--follow", action="store_true", help="keep streaming until the job finishes")
    ev.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    w = client("wait", "wait until a job finishes; exit 0 if it succeeded")
    w.add_argument("job_id", metavar="JOB_ID")
    w.add_argument("--timeout", type=float, default=24 * 3600.0)
    w.add_argument("--poll", type=float, default=2.0, help="seconds between checks")

    s = actions.add_parser("serve", help="run the JobService gRPC server")
    s.add_argument("--listen", default="127.0.0.1:50071")
    s.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
    s.add_argument("--jobs-dir", type=Path, default=None, help="shared jobs directory (informational)")
    s.add_argument("--base-model", default="demo", help="base model of jobs that name none (default: demo)")
    s.add_argument(
        "--allow-hub-downloads",
        action="store_true",
        help="accept jobs whose base model is a hub id (workers download it; default: refused)",
    )
    config.add_flags(s, JobDefaults)
    add_security_flags(s, api_keys=True)
    s.set_defaults(func=run_serve)

    wk = sub.add_parser(
        "worker",
        help="run a training worker (takes jobs from Redis)",
        description="Takes fine-tuning jobs from the Redis jobs stream, one at a time; resumes "
        "jobs whose worker died; multi-GPU jobs run under torchrun.",
    )
    add_arguments(wk)
    wk.set_defaults(func=run_worker)
