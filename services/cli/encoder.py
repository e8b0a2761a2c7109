"""``midasheng encoder``: the streaming encoder service."""

from __future__ import annotations

import argparse

from services import config
from services.cli.common import add_model_flags, add_server_flags
from services.metrics import serve_metrics
from services.runtime import redis_url_from, wait_for_shutdown
from services.transport.keys import TransportDefaults

DEFAULT_LISTEN = "127.0.0.1:50061"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from encoder_service.sessions import EncoderLimits

    p = sub.add_parser(
        "encoder",
        help="run the streaming encoder gRPC service",
        description="Streaming Dasheng encoder: per-session log-mel + encoder + projector, "
        "micro-batched across sessions; publishes audio tokens to Redis.",
    )
    add_model_flags(p)
    add_server_flags(p, DEFAULT_LISTEN)
    config.add_flags(p, EncoderLimits)
    config.add_flags(p, TransportDefaults)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encoder_service.server import start_encoder_server
    from encoder_service.sessions import EncoderLimits
    from services.model.loading import load_pretrained

    loaded = load_pretrained(args.model, args.device, args.dtype, audio_only=True)
    srv = start_encoder_server(
        loaded.model,
        redis_url_from(args.redis_url),
        args.listen,
        config.from_args(EncoderLimits, args),
        config.from_args(TransportDefaults, args),
    )
    serve_metrics(args.metrics_port)
    print(f"encoder ready on port {srv.port}", flush=True)
    return wait_for_shutdown(srv.stop)
