"""M5, M6 (and the WebRTC half of M2): the page's HTTP side. Requests naming another Host (DNS
rebinding) or coming from another Origin are refused, offers only as application/json, ``--http
:PORT`` means loopback, TURN credentials only for authenticated callers, security headers on
pages, HTTPS with the gateway's certificate; an offer with hundreds of media sections is refused
before any transport exists, and offers per address are rate limited (503 + Retry-After)."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from aiortc import RTCPeerConnection

from encoder_service.server import start_encoder_server
from services.gateway.http import parse_address
from services.gateway.server import GatewayServer, start_gateway
from services.gateway.webrtc import WebRtcLimits
from services.model.modeling import MiDashengLM
from services.security import SecuritySettings, server_security
from tests.gateway.test_http import http
from tests.security.certs import Pki
from tests.security.conftest import Keys


def browser_offer() -> str:
    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendonly")
        pc.createDataChannel("captions")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


@pytest.fixture
def make_gateway(redis_url: str, encoder_model: MiDashengLM) -> Iterator[Callable[..., GatewayServer]]:
    stopped: list[Callable[[], None]] = []

    def make(**kw: object) -> GatewayServer:
        enc = start_encoder_server(encoder_model, redis_url)
        gw = start_gateway(redis_url, f"127.0.0.1:{enc.port}", None, http_address="127.0.0.1:0", **kw)  # type: ignore[arg-type]
        stopped.extend([lambda: enc.stop(1.0), lambda: gw.stop(1.0)])
        return gw

    yield make
    for stop in reversed(stopped):
        stop()


def test_host_origin_and_content_type_are_checked(make_gateway: Callable[..., GatewayServer]) -> None:
    gw = make_gateway()
    base = f"http://127.0.0.1:{gw.http_port}"
    assert http("GET", base + "/api/sessions")[0] == 200
    assert http("GET", base + "/api/sessions", headers={"Host": "localhost"})[0] == 200
    for host in ("attacker.example", f"attacker.example:{gw.http_port}", "127.0.0.1.evil.example"):
        status, _, body = http("GET", base + "/api/sessions", headers={"Host": host})
        assert status == 421, (host, body)
        assert http("GET", base + "/", headers={"Host": host})[0] == 421
    status, _, _ = http("GET", base + "/api/sessions", headers={"Origin": "http://evil.example"})
    assert status == 403
    offer = {"sdp": browser_offer(), "type": "offer"}
    status, _, body = http(
        "POST",
        base + "/api/webrtc/offer",
        raw=json.dumps(offer).encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415, body
    status, _, body = http(
        "POST", base + "/api/webrtc/offer", offer, headers={"Origin": "http://evil.example"}
    )
    assert status == 403, body
    status, _, body = http("POST", base + "/api/webrtc/offer", offer, headers={"Origin": base})
    assert status == 200, body  # the page itself (same origin) may
    answer = json.loads(body)
    assert answer["session_id"] and len(answer["resume_secret"]) >= 32
    status, headers, _ = http("GET", base + "/")
    assert status == 200
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert parse_address(":8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080)


def test_allowed_host_names_are_configurable(make_gateway: Callable[..., GatewayServer]) -> None:
    gw = make_gateway(http_allowed_hosts=["captions.example.org"])
    base = f"http://127.0.0.1:{gw.http_port}"
    assert http("GET", base + "/healthz", headers={"Host": "captions.example.org"})[0] == 200
    assert http("GET", base + "/healthz", headers={"Host": "other.example.org"})[0] == 421


def test_turn_credentials_only_for_authenticated_callers(
    make_gateway: Callable[..., GatewayServer], keys: Keys
) -> None:
    ice = ["stun:stun.example.org:3478", "turn:user:secretpass@turn.example.org:3478"]
    open_gw = make_gateway(ice_servers=ice)
    status, _, body = http("GET", f"http://127.0.0.1:{open_gw.http_port}/api/config")
    assert status == 200 and b"secretpass" not in body and b"stun.example.org" in body
    keyed = make_gateway(ice_servers=ice, security=server_security(SecuritySettings(), str(keys.path)))
    url = f"http://127.0.0.1:{keyed.http_port}/api/config"
    assert http("GET", url)[0] == 401
    status, _, body = http("GET", url, headers={"Authorization": f"Bearer {keys.key['alice']}"})
    assert status == 200 and b"secretpass" in body


def test_the_page_is_served_over_https_with_the_gateway_certificate(
    make_gateway: Callable[..., GatewayServer], pki: Pki
) -> None:
    gw = make_gateway(http_tls=(str(pki.server.cert), str(pki.server.key)))
    ctx = ssl.create_default_context(cafile=str(pki.ca.path))
    with urllib.request.urlopen(f"https://127.0.0.1:{gw.http_port}/healthz", context=ctx, timeout=10) as r:
        assert r.status == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=10)


def test_offers_are_bounded_in_media_sections_and_rate(make_gateway: Callable[..., GatewayServer]) -> None:
    gw = make_gateway(webrtc_limits=WebRtcLimits(max_offers_per_minute=2))
    base = f"http://127.0.0.1:{gw.http_port}"
    fp = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
    sec = (
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:{i}\r\na=sendonly\r\na=rtcp-mux\r\n"
        "a=rtpmap:111 opus/48000/2\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n"
        + fp
        + "\r\na=setup:actpass\r\n"
    )
    sdp = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n" + "".join(sec.format(i=i) for i in range(700))
    status, _, body = http("POST", base + "/api/webrtc/offer", {"sdp": sdp, "type": "offer"})
    assert status == 400 and b"at most 3 media sections" in body, body
    assert len(gw.gateway) == 0
    offer = {"sdp": browser_offer(), "type": "offer"}
    assert http("POST", base + "/api/webrtc/offer", offer)[0] == 200
    status, headers, body = http("POST", base + "/api/webrtc/offer", offer)
    assert status == 503 and int(headers["Retry-After"]) >= 1, body  # the 700-section one counted too
    assert b"at most 2 a minute" in body
