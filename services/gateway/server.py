"""The gateway process: public gRPC API (and, with it, the web page and WebRTC ingest)."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import grpc
import redis

from services import rpc
from services.gateway.grpc_api import SERVICE, CaptionServicer, GrpcEncoderLink
from services.gateway.http import HttpServer, parse_address, start_http
from services.gateway.live import GatewayLimits, LiveGateway
from services.gateway.webrtc import ice_servers_from
from services.metrics import serve_metrics
from services.pb.midasheng.v1 import captions_pb2_grpc
from services.runtime import Periodic, redis_url_from, wait_for_shutdown

log = logging.getLogger(__name__)


@dataclass
class GatewayServer:
    server: grpc.Server
    port: int
    gateway: LiveGateway
    encoder: GrpcEncoderLink
    servicer: CaptionServicer
    _reaper: Periodic
    http: HttpServer | None = None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    def stop(self, grace: float = 2.0) -> None:
        if self.http is not None:
            self.http.stop()  # closes WebRTC peers (finalizing their sessions) while the encoder link is up
        self._reaper.stop()
        self.server.stop(grace).wait(grace + 1)
        self.encoder.shutdown()
        self.servicer.close()
        self.gateway.redis.close()


def start_gateway(
    redis_url: str,
    encoder_target: str,
    lm_target: str | None,
    address: str = "127.0.0.1:0",
    limits: GatewayLimits | None = None,
    token: str | None = None,
    max_workers: int = 64,
    http_address: str | None = None,
    ice_servers: list[str] | None = None,
) -> GatewayServer:
    client = redis.Redis.from_url(redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    encoder = GrpcEncoderLink(encoder_target)
    gateway = LiveGateway(client, encoder, limits)
    server = rpc.make_server(max_workers=max_workers)
    servicer = CaptionServicer(gateway, lm_target, token)
    captions_pb2_grpc.add_CaptionServiceServicer_to_server(servicer, server)
    rpc.add_health_and_reflection(server, [SERVICE])
    port = rpc.bind(server, address)
    server.start()
    reaper = Periodic("gateway-reaper", 1.0, gateway.reap).start()
    log.info("gateway listening on port %d", port)
    srv = GatewayServer(server, port, gateway, encoder, servicer, reaper)
    if http_address:
        try:
            srv.http = start_http(
                gateway, *parse_address(http_address), token=token, ice_servers=ice_servers_from(ice_servers)
            )
        except BaseException:
            srv.stop()
            raise
    return srv


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gateway",
        help="run the public gateway (gRPC streaming API)",
        description="Public StreamCaptions/Caption/BatchCaption API; drives the encoder service "
        "and relays caption events from Redis.",
    )
    p.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address (default: 127.0.0.1:50051)")
    p.add_argument("--encoder", default="127.0.0.1:50061", help="encoder service address")
    p.add_argument(
        "--lm", default="127.0.0.1:50062", help="LM service address (offline Caption/BatchCaption)"
    )
    p.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
    p.add_argument(
        "--token",
        default=os.environ.get("MIDASHENG_TOKEN"),
        help="require 'authorization: Bearer TOKEN' (default: $MIDASHENG_TOKEN; none = open)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=GatewayLimits.idle_timeout_seconds,
        help="seconds without audio or keep-alive before a session is finalized",
    )
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="serve the web page, monitoring view and WebRTC ingest here (default: off)",
    )
    p.add_argument(
        "--ice-server",
        action="append",
        default=None,
        metavar="URL",
        help="STUN/TURN server for WebRTC, repeatable: stun:HOST:PORT or turn:USER:PASS@HOST:PORT "
        "(default: $MIDASHENG_ICE_SERVERS, comma-separated; none = fine on loopback and LANs)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    limits = GatewayLimits(idle_timeout_seconds=args.idle_timeout)
    srv = start_gateway(
        redis_url_from(args.redis_url),
        args.encoder,
        args.lm,
        args.listen,
        limits,
        args.token,
        http_address=args.http,
        ice_servers=args.ice_server,
    )
    serve_metrics(args.metrics_port)
    print(f"gateway ready on port {srv.port}", flush=True)
    if srv.http is not None:
        print(f"web page on http://{args.http}/ (port {srv.http_port})", flush=True)
    return wait_for_shutdown(srv.stop)
