"""The gateway process: public gRPC API (and, with it, the web page and WebRTC ingest)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from services import rpc
from services.gateway.grpc_api import METHOD_SCOPES, SERVICE, CaptionServicer, GrpcEncoderLink
from services.gateway.http import HttpServer, parse_address, start_http
from services.gateway.live import GatewayLimits, LiveGateway
from services.gateway.webrtc import WebRtcLimits, ice_servers_from
from services.monitor.limits import MonitorLimits
from services.monitor.live import LiveMonitor
from services.monitor.webhook import WebhookLimits
from services.pb.midasheng.v1 import captions_pb2_grpc
from services.runtime import Periodic
from services.security import INSECURE, Authenticator, ClientCredentials, ServerSecurity, with_legacy_token
from services.transport.connect import connect
from services.transport.keys import TransportDefaults

log = logging.getLogger(__name__)
HEALTH_THREADS = 8  # threads no group of calls can take: health checks always find one
OTHER_CALLS = 8  # reflection and health watches at once
CALL_GROUPS = {
    f"/{SERVICE}/StreamCaptions": "stream",  # at most GatewayLimits.max_sessions
    f"/{SERVICE}/Caption": "offline",  # at most GatewayLimits.max_offline_calls
    f"/{SERVICE}/BatchCaption": "offline",
}


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

    def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: new calls are refused at once (health checks fail, so balancers move
        on), open streams get ``grace`` seconds (default ``GatewayLimits.drain_seconds``) to end;
        a stream cut then can be resumed through another gateway."""
        grace = self.gateway.limits.drain_seconds if grace is None else grace
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
    max_workers: int | None = None,
    http_address: str | None = None,
    ice_servers: list[str] | None = None,
    webrtc_limits: WebRtcLimits | None = None,
    defaults: TransportDefaults | None = None,
    security: ServerSecurity | None = None,
    internal: ClientCredentials = INSECURE,
    http_tls: tuple[str, str] | None = None,
    http_allowed_hosts: Sequence[str] = (),
    monitor_limits: MonitorLimits | None = None,
    webhook_limits: WebhookLimits | None = None,
) -> GatewayServer:
    """The gateway: public gRPC API on ``address`` (and the web page on ``http_address``).

    ``security``: TLS and who may call (API keys, a client CA); ``token`` is the single access
    token of older deployments (tenant ``default``); neither = open. ``internal``: how the
    gateway calls the encoder and LM services (TLS, service token)."""
    security = security or ServerSecurity(auth=Authenticator())
    if token:
        security.auth.api_keys = with_legacy_token(security.auth.api_keys, token)
    client = connect(redis_url, socket_timeout=10.0)
    encoder = GrpcEncoderLink(encoder_target, credentials=internal)
    gateway = LiveGateway(client, encoder, limits, defaults)
    lim = gateway.limits
    if lim.monitoring:
        gateway.monitor = LiveMonitor(
            redis_url, gateway.hub, gateway.defaults.captions_maxlen, monitor_limits, webhook_limits
        )
    calls = {"stream": lim.max_sessions, "offline": lim.max_offline_calls, "other": OTHER_CALLS}
    limiter = rpc.ConcurrencyLimit(calls, CALL_GROUPS, lim.retry_after_seconds)
    threads = max_workers or sum(calls.values()) + HEALTH_THREADS  # every group's calls, and health
    server = rpc.make_server(
        max_workers=threads,
        interceptors=[*security.interceptors(METHOD_SCOPES), limiter],
        maximum_concurrent_rpcs=threads,
    )
    servicer = CaptionServicer(gateway, lm_target, security.auth, internal)
    captions_pb2_grpc.add_CaptionServiceServicer_to_server(servicer, server)
    rpc.add_health_and_reflection(server, [SERVICE])
    try:
        port = rpc.bind(server, address, security.credentials)
    except BaseException:  # e.g. the port is taken: let go of what was started
        servicer.close()
        encoder.shutdown()
        gateway.close()
        client.close()
        raise
    server.start()
    reaper = Periodic("gateway-reaper", 1.0, gateway.reap).start()
    log.info("gateway listening on port %d", port)
    srv = GatewayServer(server, port, gateway, encoder, servicer, reaper)
    if http_address:
        try:
            srv.http = start_http(
                gateway,
                *parse_address(http_address),
                auth=security.auth,
                ice_servers=ice_servers_from(ice_servers),
                limits=webrtc_limits,
                tls=http_tls,
                allowed_hosts=http_allowed_hosts,
                redis_url=redis_url,
            )
        except BaseException:
            srv.stop()
            raise
    return srv
