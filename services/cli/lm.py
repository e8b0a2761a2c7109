"""``midasheng lm``: the LM caption service and its live worker loop(s)."""

from __future__ import annotations

import argparse

from services import config
from services.cli.common import add_model_flags, add_security_flags, add_server_flags, security_from
from services.metrics import serve_metrics
from services.runtime import redis_url_from, wait_for_shutdown
from services.transport.keys import TransportDefaults

DEFAULT_LISTEN = "127.0.0.1:50062"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lm_service.engines import DEFAULT_ENGINE, ENGINES
    from lm_service.engines.limits import EngineLimits
    from lm_service.server import OfflineLimits
    from lm_service.worker import WorkerLimits

    p = sub.add_parser(
        "lm",
        help="run the LM caption service and live worker(s)",
        description="Caption engine: leases live sessions from Redis and writes caption events; "
        "serves offline Caption/BatchCaption over gRPC.",
    )
    add_model_flags(p)
    add_server_flags(p, DEFAULT_LISTEN)
    p.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        choices=ENGINES,
        help=f"caption engine (default: {DEFAULT_ENGINE})",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="captions per decoder batch of the reference engine (default: 16)",
    )
    p.add_argument("--workers", type=int, default=1, help="live worker loops in this process")
    p.add_argument("--worker-id", default=None, help="worker id prefix (default: random)")
    p.add_argument(
        "--adapters-dir", default=None, help="directory of LoRA adapters (NAME/adapter_config.json)"
    )
    p.add_argument(
        "--adapters-from-redis",
        action="store_true",
        help="load adapters by name from the jobs registry in Redis (instead of --adapters-dir)",
    )
    config.add_flags(p, EngineLimits)
    config.add_flags(p, WorkerLimits)
    config.add_flags(p, OfflineLimits)
    config.add_flags(p, TransportDefaults)
    add_security_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lm_service.engines.limits import EngineLimits
    from lm_service.server import OfflineLimits, build_engine, start_lm_server
    from lm_service.worker import WorkerLimits
    from services.security import server_security

    security = server_security(security_from(args))  # before any weight is loaded: fails fast
    redis_url = redis_url_from(args.redis_url)
    engine = build_engine(
        args.model,
        args.device,
        args.dtype,
        args.adapters_dir,
        redis_url if args.adapters_from_redis else None,
        engine=args.engine,
        max_batch=args.max_batch,
        limits=config.from_args(EngineLimits, args),
    )
    srv = start_lm_server(
        engine,
        redis_url,
        args.listen,
        args.workers,
        defaults=config.from_args(TransportDefaults, args),
        worker_prefix=args.worker_id,
        limits=config.from_args(WorkerLimits, args),
        security=security,
        offline=config.from_args(OfflineLimits, args),
    )
    serve_metrics(args.metrics_port)
    print(f"lm ready on port {srv.port}", flush=True)

    def stop() -> None:
        srv.stop()
        engine.close()

    return wait_for_shutdown(stop)
