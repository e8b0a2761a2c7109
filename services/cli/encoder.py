"""``midasheng encoder``: the streaming encoder service."""

from __future__ import annotations

import argparse
import os

from services import config
from services.cli.common import add_model_flags, add_security_flags, add_server_flags, security_from
from services.metrics import serve_metrics
from services.runtime import redis_url_from, wait_for_shutdown
from services.transport.keys import TransportDefaults

DEFAULT_LISTEN = "127.0.0.1:50061"
BACKEND_ENV = "MIDASHENG_ENCODER_BACKEND"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from encoder_service.backends import BACKENDS
    from encoder_service.backends.triton_backend import TritonSettings
    from encoder_service.sessions import EncoderLimits

    p = sub.add_parser(
        "encoder",
        help="run the streaming encoder gRPC service",
        description="Streaming Dasheng encoder: per-session log-mel + encoder + projector, "
        "micro-batched across sessions; publishes audio tokens to Redis. The encoder itself runs "
        "in this process (--backend torch) or on a Triton Inference Server (--backend triton).",
    )
    add_model_flags(p)
    add_server_flags(p, DEFAULT_LISTEN)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get(BACKEND_ENV) or "torch",
        help=f"where the encoder runs (default: torch; env {BACKEND_ENV}); with triton the "
        "checkpoint provides the projector and the frontend, on --device",
    )
    config.add_flags(p, EncoderLimits)
    config.add_flags(p, TritonSettings)
    config.add_flags(p, TransportDefaults)
    add_security_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encoder_service.backends import EncoderBackend
    from encoder_service.server import start_encoder_server
    from encoder_service.sessions import EncoderLimits
    from services.model.loading import load_pretrained, pick_device
    from services.security import server_security

    security = server_security(security_from(args))  # before any weight is loaded: fails fast
    backend: EncoderBackend | None = None
    if args.backend == "triton":
        from encoder_service.backends.triton_backend import TritonBackend, TritonSettings

        settings = config.from_args(TritonSettings, args)  # checked before any weight is loaded
        # The encoder's weights stay on the CPU, unused; only the projector moves to the device.
        loaded = load_pretrained(args.model, "cpu", args.dtype, audio_only=True)
        loaded.model.audio_projector.to(pick_device(args.device))
        backend = TritonBackend(settings, loaded.model.config.audio_encoder_config)
    else:
        loaded = load_pretrained(args.model, args.device, args.dtype, audio_only=True)
    srv = start_encoder_server(
        loaded.model,
        redis_url_from(args.redis_url),
        args.listen,
        config.from_args(EncoderLimits, args),
        config.from_args(TransportDefaults, args),
        backend=backend,
        security=security,
    )
    serve_metrics(args.metrics_port)
    print(f"encoder ready on port {srv.port} ({srv.backend.name} backend)", flush=True)
    return wait_for_shutdown(srv.stop)
