"""``midasheng gateway``: the public gRPC API, and with ``--http`` the web page and WebRTC ingest."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from services import config
from services.cli.common import add_security_flags, add_server_flags, security_from
from services.errors import ConfigError
from services.gateway.live import GatewayLimits
from services.gateway.webrtc import WebRtcLimits
from services.metrics import serve_metrics
from services.monitor.limits import MonitorLimits
from services.monitor.webhook import WebhookLimits
from services.runtime import redis_url_from, wait_for_shutdown
from services.transport.keys import TransportDefaults

DEFAULT_LISTEN = "127.0.0.1:50051"
TOKEN_ENV = "MIDASHENG_TOKEN"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gateway",
        help="run the public gateway (gRPC streaming API)",
        description="Public StreamCaptions/Caption/BatchCaption API; drives the encoder service "
        "and relays caption events from Redis.",
    )
    add_server_flags(p, DEFAULT_LISTEN)
    p.add_argument("--encoder", default="127.0.0.1:50061", help="encoder service address")
    p.add_argument(
        "--lm", default="127.0.0.1:50062", help="LM service address (offline Caption/BatchCaption)"
    )
    p.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="serve the web page, monitoring view and WebRTC ingest here (default: off)",
    )
    p.add_argument(
        "--http-allowed-hosts",
        default="",
        metavar="NAMES",
        help="comma-separated Host names the page answers to beside loopback and the --http host "
        "(requests naming any other host are refused: no DNS rebinding)",
    )
    p.add_argument(
        "--ice-server",
        action="append",
        default=None,
        metavar="URL",
        help="STUN/TURN server for WebRTC, repeatable: stun:HOST:PORT or turn:USER:PASS@HOST:PORT "
        "(default: $MIDASHENG_ICE_SERVERS, comma-separated; none = fine on loopback and LANs)",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="gRPC threads (each open stream holds one; default: --max-sessions + --max-offline-calls + 16)",
    )
    config.add_flags(p, GatewayLimits)
    config.add_flags(p, WebRtcLimits)
    config.add_flags(p, MonitorLimits)
    config.add_flags(p, WebhookLimits)
    config.add_flags(p, TransportDefaults)
    p.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"file holding the access token every call must carry as 'authorization: Bearer TOKEN' "
        f"(tenant 'default'; default: ${TOKEN_ENV}). Prefer --api-keys-file. Tokens never go on the "
        "command line.",
    )
    add_security_flags(p, api_keys=True)
    p.set_defaults(func=run)


def read_token(path: str | None) -> str | None:
    """The gateway's access token: from ``path`` (stripped), else ``$MIDASHENG_TOKEN``, else None."""
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the token file {path}: {e.strerror}") from e
        if not token:
            raise ConfigError(f"the token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    from services.gateway.server import start_gateway
    from services.security import client_credentials, server_security

    settings = security_from(args)
    srv = start_gateway(
        redis_url_from(args.redis_url),
        args.encoder,
        args.lm,
        args.listen,
        config.from_args(GatewayLimits, args),
        None,
        max_workers=args.max_workers,
        http_address=args.http,
        ice_servers=args.ice_server,
        webrtc_limits=config.from_args(WebRtcLimits, args),
        defaults=config.from_args(TransportDefaults, args),
        security=server_security(
            settings, args.api_keys_file, read_token(args.token_file), service_token=False
        ),
        internal=client_credentials(settings),
        http_tls=(settings.tls_cert, settings.tls_key) if settings.serves_tls else None,
        http_allowed_hosts=[h.strip() for h in args.http_allowed_hosts.split(",") if h.strip()],
        monitor_limits=config.from_args(MonitorLimits, args),
        webhook_limits=config.from_args(WebhookLimits, args),
    )
    serve_metrics(args.metrics_port)
    print(f"gateway ready on port {srv.port}", flush=True)
    if srv.http is not None:
        scheme = "https" if settings.serves_tls else "http"
        print(f"web page on {scheme}://{args.http}/ (port {srv.http_port})", flush=True)
    return wait_for_shutdown(srv.stop)
