"""The gateway's web side against the in-process stack: pages, offers (good and bad), auth, session
read-outs, downloads, and cleanup of peers that stop or vanish. The WebRTC client is aiortc."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from encoder_service.server import start_encoder_server
from lm_service.server import start_lm_server
from services.audio.subtitles import parse_webvtt
from services.gateway.http import start_http
from services.gateway.server import GatewayServer, start_gateway
from services.gateway.webrtc import AudioBuffer, WebRtcLimits, parse_ice_server
from services.training.synth import render_sound, types_in_caption
from services.wire.settings import settings_from_json

RATE = 48000  # Hz, what a browser sends
FRAME = 960  # samples, 20 ms (one Opus frame)
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def models(encoder_model: Any, engine: Any) -> tuple[Any, Any]:
    return encoder_model, engine


@dataclass
class Stack:
    gateway: GatewayServer
    base: str
    closers: list[Any] = field(default_factory=list)


@contextlib.contextmanager
def running_stack(redis_url: str, models: tuple[Any, Any], token: str | None = None) -> Iterator[Stack]:
    """encoder + LM + gateway (gRPC and HTTP on free loopback ports), stopped in reverse order."""
    model, engine = models
    enc = start_encoder_server(model, redis_url)
    lm = start_lm_server(engine, redis_url)
    gw = start_gateway(
        redis_url, f"127.0.0.1:{enc.port}", f"127.0.0.1:{lm.port}", token=token, http_address="127.0.0.1:0"
    )
    try:
        yield Stack(gw, f"http://127.0.0.1:{gw.http_port}")
    finally:
        gw.stop()
        lm.stop()
        enc.stop()


@pytest.fixture
def stack(redis_url: str, models: tuple[Any, Any]) -> Iterator[Stack]:
    with running_stack(redis_url, models) as s:
        yield s


def http(
    method: str,
    url: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


class SoundTrack(MediaStreamTrack):
    """A browser-like 48 kHz mono audio track playing ``clips`` in order, in real time.

    ``silent_after`` seconds in, it stops producing frames without ending (a vanished sender).
    """

    kind = "audio"

    def __init__(self, samples: np.ndarray, silent_after: float | None = None) -> None:
        super().__init__()
        self.pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        self.silent_after = silent_after
        self.pos = 0
        self.t0: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = time.monotonic()
        due = self.t0 + self.pos / RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if self.silent_after is not None and self.pos / RATE >= self.silent_after:
            await asyncio.Event().wait()  # never returns: the sender went quiet without a BYE
        chunk = self.pcm[self.pos % len(self.pcm) :][:FRAME]
        if chunk.size < FRAME:
            chunk = np.concatenate([chunk, self.pcm[: FRAME - chunk.size]])
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.pos
        frame.time_base = fractions.Fraction(1, RATE)
        self.pos += FRAME
        return frame


def sounds(*parts: tuple[str, float], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([render_sound(name, rng, int(sec * RATE), sr=RATE) for name, sec in parts])


class Client:
    """An aiortc 'browser': offers audio + a "captions" data channel, collects the JSON messages."""

    def __init__(self, base: str, track: MediaStreamTrack, token: str | None = None) -> None:
        self.base, self.track, self.token = base, track, token
        self.pc = RTCPeerConnection()
        self.messages: list[dict[str, Any]] = []
        self.channel = self.pc.createDataChannel("captions")
        self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        self.pc.addTrack(track)
        self.session_id = ""

    async def connect(self, config: dict[str, Any] | None = None) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer", "config": config or {}}
        status, _, raw = await asyncio.to_thread(http, "POST", f"{self.base}/api/webrtc/offer", body, headers)
        assert status == 200, raw
        answer = json.loads(raw)
        self.session_id = answer["session_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    async def wait_for(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for m in self.messages[seen:]:
                if pred(m):
                    return m
            seen = len(self.messages)
            await asyncio.sleep(0.05)
        captions = [m.get("text") for m in self.messages if m["type"] == "caption"]
        raise AssertionError(f"no {what} within {timeout} s; captions so far: {captions[-8:]}")


def names(sound: str) -> Any:
    return lambda m: m["type"] == "caption" and sound in types_in_caption(m["text"])


# --- pure helpers ---------------------------------------------------------------------------------


def test_audio_buffer_drops_oldest_and_counts() -> None:
    buf = AudioBuffer(10)
    assert buf.push(np.arange(6, dtype=np.float32)) == 0
    assert buf.push(np.arange(6, 12, dtype=np.float32)) == 2
    assert buf.size == 10
    np.testing.assert_array_equal(buf.take(4), [2, 3, 4, 5])
    np.testing.assert_array_equal(buf.take(100), [6, 7, 8, 9, 10, 11])
    assert buf.size == 0 and buf.take(3).size == 0


def test_config_and_ice_parsing() -> None:
    s = settings_from_json(
        {"prompt": "What is heard?", "window_seconds": "5", "hop_seconds": 1, "adapter": ""}
    )
    assert (s.sample_rate, s.encoding, s.channels) == (16000, "FLOAT32", 1)
    assert (s.session.window_seconds, s.session.hop_seconds, s.session.prompt) == (5.0, 1.0, "What is heard?")
    for bad in (
        {"window_seconds": "ten"},
        {"interim_results": "yes"},
        {"colour": 1},
        [1],
        {"window_seconds": True},
    ):
        with pytest.raises(ValueError):
            settings_from_json(bad)
    turn = parse_ice_server("turn:alice:pa%3Ass@turn.example.org:3478?transport=udp")
    assert (turn.urls, turn.username, turn.credential) == (
        "turn:turn.example.org:3478?transport=udp",
        "alice",
        "pa:ss",
    )
    assert parse_ice_server("stun:stun.example.org:3478").username is None
    with pytest.raises(ValueError):
        parse_ice_server("http://example.org")


# --- the web server -------------------------------------------------------------------------------


def test_pages_static_and_health(stack: Stack) -> None:
    status, headers, body = http("GET", f"{stack.base}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    for testid in ("live-caption", "history", "start-mic", "state"):
        assert f'data-testid="{testid}"' in page
    status, _, body = http("GET", f"{stack.base}/monitor")
    assert status == 200 and b"/static/monitor.js" in body
    for name, kind in (("app.js", "javascript"), ("monitor.js", "javascript"), ("style.css", "text/css")):
        status, headers, body = http("GET", f"{stack.base}/static/{name}")
        assert status == 200 and kind in headers["Content-Type"] and body
    assert http("GET", f"{stack.base}/static/missing.js")[0] == 404
    assert http("GET", f"{stack.base}/static/../http.py")[0] in (403, 404)
    assert http("GET", f"{stack.base}/healthz")[:3:2] == (200, b"ok")
    status, _, body = http("GET", f"{stack.base}/api/config")
    assert status == 200 and json.loads(body)["ice_servers"] == []


def _error_of(resp: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = resp
    assert headers["Content-Type"].startswith("application/json"), body
    return status, json.loads(body)["error"]


def test_bad_offers_get_400_with_a_message_and_the_server_keeps_serving(stack: Stack) -> None:
    url = f"{stack.base}/api/webrtc/offer"
    status, msg = _error_of(http("POST", url, raw=b"{not json"))
    assert status == 400 and "JSON" in msg
    status, msg = _error_of(http("POST", url, {"sdp": "hello", "type": "offer"}))
    assert status == 400 and "SDP" in msg
    broken = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=garbage\r\n"
    status, msg = _error_of(http("POST", url, {"sdp": broken, "type": "offer"}))
    assert status == 400 and msg
    status, msg = _error_of(http("POST", url, {"sdp": "v=0\r\n", "type": "answer"}))
    assert status == 400 and "offer" in msg
    status, msg = _error_of(
        http("POST", url, {"sdp": "v=0\r\nm=audio", "type": "offer", "config": {"window_seconds": 0.5}})
    )
    assert status == 400 and "window_seconds" in msg
    status, msg = _error_of(
        http("POST", url, {"sdp": "v=0\r\nm=audio", "type": "offer", "config": {"prompt": "x" * 600}})
    )
    assert status == 400 and "prompt" in msg
    assert _error_of(http("GET", f"{stack.base}/api/nothing"))[0] == 404
    assert len(stack.gateway.gateway) == 0  # no session leaked by the refusals

    async def good() -> None:
        client = Client(stack.base, SoundTrack(sounds(("high_tone", 4.0))))
        await client.connect({"window_seconds": 4, "hop_seconds": 1})
        await client.wait_for(lambda m: m["type"] == "started", 10, "started message")
        await client.pc.close()

    asyncio.run(good())


def test_token_is_required_when_configured(redis_url: str, models: tuple[Any, Any]) -> None:
    with running_stack(redis_url, models, token=TOKEN) as s:
        url = f"{s.base}/api/webrtc/offer"
        body = {"sdp": "hello", "type": "offer"}
        status, msg = _error_of(http("POST", url, body))
        assert status == 401 and "Bearer" in msg
        status, msg = _error_of(http("POST", url, body, {"Authorization": "Bearer wrong"}))
        assert status == 401 and "not valid" in msg
        assert http("GET", f"{s.base}/api/sessions")[0] == 401
        assert http("GET", f"{s.base}/api/config")[0] == 401
        assert http("POST", url, body, {"Authorization": f"Bearer {TOKEN}"})[0] == 400  # past auth
        assert http("GET", f"{s.base}/api/sessions", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert http("GET", f"{s.base}/")[0] == 200  # the page itself is open
        assert http("GET", f"{s.base}/healthz")[0] == 200

        async def good() -> None:
            client = Client(s.base, SoundTrack(sounds(("high_tone", 4.0))), token=TOKEN)
            await client.connect()
            await client.wait_for(lambda m: m["type"] == "started", 10, "started message")
            await client.pc.close()

        asyncio.run(good())


def test_live_session_captions_listing_and_downloads(stack: Stack) -> None:
    async def scenario() -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        client = Client(stack.base, SoundTrack(sounds(("high_tone", 30.0))))
        await client.connect({"window_seconds": 4, "hop_seconds": 1, "prompt": "Caption the audio."})
        started = await client.wait_for(lambda m: m["type"] == "started", 10, "started message")
        assert started["session_id"] == client.session_id
        assert started["config"]["window_seconds"] == 4.0
        tone = await client.wait_for(names("high_tone"), 30, "caption naming the high tone")
        assert {"event_id", "segment_id", "revision", "window_start", "window_end", "is_final"} <= set(tone)
        status, _, raw = await asyncio.to_thread(http, "GET", f"{stack.base}/api/sessions")
        listing = json.loads(raw)
        await client.wait_for(lambda m: m["type"] == "caption" and m["is_final"], 30, "a final caption")
        client.channel.send(json.dumps({"type": "stop"}))
        await client.wait_for(lambda m: m["type"] == "ended", 20, "ended message")
        await client.pc.close()
        return client.session_id, client.messages, listing

    sid, messages, listing = asyncio.run(scenario())
    mine = [s for s in listing["sessions"] if s["id"] == sid]
    assert mine, listing
    card = mine[0]
    assert card["webrtc"] and card["audio_seconds"] > 0 and card["window_seconds"] == 4.0
    assert card["latest"]["text"] and card["latest"]["age_seconds"] >= 0

    finals = [m for m in messages if m["type"] == "caption" and m["is_final"]]
    assert finals and [m["segment_id"] for m in finals] == sorted({m["segment_id"] for m in finals})
    status, headers, body = http("GET", f"{stack.base}/api/sessions/{sid}/captions.vtt")
    assert status == 200 and headers["Content-Type"].startswith("text/vtt")
    cues = parse_webvtt(body.decode())
    assert [c.text for c in cues] == [m["text"] for m in finals]
    assert any("high_tone" in types_in_caption(c.text) for c in cues)
    status, _, body = http("GET", f"{stack.base}/api/sessions/{sid}/captions.json")
    data = json.loads(body)
    assert status == 200 and [e["event_id"] for e in data["events"]] == [
        m["event_id"] for m in messages if "event_id" in m
    ]
    assert data["events"][-1]["type"] == "ended"
    assert http("GET", f"{stack.base}/api/sessions/nope/captions.vtt")[0] == 404
    assert http("GET", f"{stack.base}/api/sessions/no%20pe/captions.json")[0] == 404

    deadline = time.monotonic() + 10  # the peer is gone; the session shows as recently ended
    while len(stack.gateway.gateway) or stack.gateway.http.ingest.peers:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "peer / session not cleaned up"
        time.sleep(0.1)
    listing = json.loads(http("GET", f"{stack.base}/api/sessions")[2])
    assert sid not in [s["id"] for s in listing["sessions"]]
    assert sid in [s["id"] for s in listing["recent"]]


def test_vanished_and_closed_peers_are_cleaned_up(redis_url: str, models: tuple[Any, Any]) -> None:
    """A sender that goes quiet is closed after the inactivity timeout; a closed client right away."""
    with running_stack(redis_url, models) as s:
        gateway = s.gateway.gateway
        web = start_http(gateway, "127.0.0.1", 0, limits=WebRtcLimits(inactivity_seconds=2.0))
        base = f"http://127.0.0.1:{web.port}"
        try:

            async def scenario() -> list[dict[str, Any]]:
                quiet = Client(base, SoundTrack(sounds(("high_tone", 5.0)), silent_after=1.0))
                await quiet.connect()
                closing = Client(base, SoundTrack(sounds(("white_noise", 5.0))))
                await closing.connect()
                await closing.wait_for(lambda m: m["type"] == "started", 10, "started message")
                assert len(web.ingest.peers) == 2 and len(gateway) == 2
                await closing.pc.close()  # an orderly goodbye: DTLS close -> track end / state closed
                deadline = time.monotonic() + 10
                while len(web.ingest.peers) > 1:
                    assert time.monotonic() < deadline, "closed client's peer was not cleaned up"
                    await asyncio.sleep(0.1)
                err = await quiet.wait_for(lambda m: m["type"] == "error", 10, "idle error")
                assert err["reason"] == "idle" and "no audio" in err["message"]
                ended = await quiet.wait_for(lambda m: m["type"] == "ended", 15, "ended message")
                assert ended["reason"] == "end_of_stream"  # finalized: the open window got its final caption
                assert any(m["type"] == "caption" and m["is_final"] for m in quiet.messages)
                deadline = time.monotonic() + 10
                while web.ingest.peers or len(gateway):
                    assert time.monotonic() < deadline, "quiet peer was not cleaned up"
                    await asyncio.sleep(0.1)
                await quiet.pc.close()
                return quiet.messages

            asyncio.run(scenario())
            assert {r for _, (_, r) in web.ingest.recently_ended.items()} >= {"idle"}
        finally:
            web.stop()


class FakeChannel:
    def __init__(self) -> None:
        self.readyState = "open"
        self.bufferedAmount = 0
        self.sent: list[dict[str, Any]] = []

    def send(self, data: str) -> None:
        self.sent.append(json.loads(data))


def test_backed_up_channel_holds_interims_but_never_finals() -> None:
    from types import SimpleNamespace

    from services.gateway.webrtc import Peer

    async def scenario() -> list[dict[str, Any]]:
        peer = Peer(SimpleNamespace(limits=WebRtcLimits(high_water_bytes=1000)), None)  # type: ignore[arg-type]
        ch = FakeChannel()
        peer.channel = ch  # type: ignore[assignment]

        def cap(seg: int, rev: int, final: bool) -> dict[str, Any]:
            return {
                "type": "caption",
                "segment_id": seg,
                "revision": rev,
                "is_final": final,
                "text": f"{seg}.{rev}",
            }

        peer.deliver(cap(0, 1, False))
        ch.bufferedAmount = 5000  # the browser is not reading fast enough
        peer.deliver(cap(0, 2, False))
        peer.deliver(cap(0, 3, False))
        peer.flush_pending()  # still backed up: nothing
        ch.bufferedAmount = 0
        peer.flush_pending()  # only the newest held interim goes out
        ch.bufferedAmount = 5000
        peer.deliver(cap(1, 1, False))
        peer.deliver(cap(1, 2, True))  # a final always goes out and supersedes the held interim
        peer.deliver({"type": "ended", "reason": "end_of_stream"})
        ch.bufferedAmount = 0
        peer.flush_pending()
        return ch.sent

    sent = asyncio.run(scenario())
    assert [m.get("text", m["type"]) for m in sent] == ["0.1", "0.3", "1.2", "ended"]


def test_at_capacity_offers_get_503_and_capacity_returns(redis_url: str, models: tuple[Any, Any]) -> None:
    from services.gateway.live import GatewayLimits, LiveGateway

    with running_stack(redis_url, models) as s:
        small = LiveGateway(s.gateway.gateway.redis, s.gateway.encoder, GatewayLimits(max_sessions=1))
        web = start_http(small, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{web.port}"
        try:

            async def scenario() -> None:
                first = Client(base, SoundTrack(sounds(("mid_tone", 5.0))))
                await first.connect()
                await first.wait_for(lambda m: m["type"] == "started", 10, "started message")
                second = Client(base, SoundTrack(sounds(("mid_tone", 5.0))))
                await second.pc.setLocalDescription(await second.pc.createOffer())
                body = {"sdp": second.pc.localDescription.sdp, "type": "offer"}
                status, _, raw = await asyncio.to_thread(http, "POST", f"{base}/api/webrtc/offer", body)
                assert status == 503 and "maximum" in json.loads(raw)["error"]
                await second.pc.close()
                await first.pc.close()
                deadline = time.monotonic() + 10
                while len(small):
                    assert time.monotonic() < deadline, "session not released"
                    await asyncio.sleep(0.1)
                third = Client(base, SoundTrack(sounds(("mid_tone", 5.0))))
                await third.connect()
                await third.wait_for(lambda m: m["type"] == "started", 10, "started message")
                await third.pc.close()

            asyncio.run(scenario())
        finally:
            web.stop()
            small.close()
