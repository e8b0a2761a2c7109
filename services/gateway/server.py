"""The gateway process: public gRPC API (and, with it, the web page and WebRTC ingest)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import redis

from services import rpc
from services.gateway.grpc_api import SERVICE, CaptionServicer, GrpcEncoderLink
from services.gateway.http import HttpServer, parse_address, start_http
from services.gateway.live import GatewayLimits, LiveGateway
from services.gateway.webrtc import WebRtcLimits, ice_servers_from
from services.pb.midasheng.v1 import captions_pb2_grpc
from services.runtime import Periodic
from services.transport.keys import TransportDefaults

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
        self.gateway.close()
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
    webrtc_limits: WebRtcLimits | None = None,
    defaults: TransportDefaults | None = None,
) -> GatewayServer:
    client = redis.Redis.from_url(redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    encoder = GrpcEncoderLink(encoder_target)
    gateway = LiveGateway(client, encoder, limits, defaults)
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
                gateway,
                *parse_address(http_address),
                token=token,
                ice_servers=ice_servers_from(ice_servers),
                limits=webrtc_limits,
            )
        except BaseException:
            srv.stop()
            raise
    return srv
