"""WebRTC ingest: browser audio over aiortc -> LiveSession; caption events back over a data channel.

One :class:`Peer` per ``RTCPeerConnection``. Its audio track is always drained (an unconsumed
aiortc track queues decoded frames without bound), resampled once to 16 kHz mono float32, kept
in a bounded buffer (oldest audio dropped and counted when the encoder falls behind) and fed to
the session in ~160 ms chunks from a thread (``LiveSession.feed`` blocks on gRPC). Caption events
are read from Redis and sent as JSON on the "captions" data channel the client opens (captions,
answers to the session's questions, alerts); the client may change the session's questions on it
(``{"type": "questions", "questions": [...]}``).

A peer ends gracefully (finalize, relay the last caption and "ended", then close) when the client
sends ``{"type": "stop"}``, when its track ends, or when no audio frame arrived for
``inactivity_seconds`` (a sender that vanished or stopped sending without closing). It closes at
once when its connection state turns failed/closed (aiortc's ICE consent checks fail ~30 s after a
browser vanishes) or at shutdown. Either way the session is finalized (the open window gets its
final caption in Redis, so downloads are complete) and forgotten at the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar
from urllib.parse import unquote

import av
import numpy as np
from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from services import metrics
from services.constants import SAMPLE_RATE
from services.errors import FailedPrecondition, InvalidArgument, MidashengError, ResourceExhausted
from services.gateway.live import LiveGateway, LiveSession, check_limits
from services.gateway.quotas import RateLimit, Release
from services.wire.events import EndEvent
from services.wire.settings import StreamSettings, questions_from_json, questions_to_json

log = logging.getLogger(__name__)

CHANNEL_LABEL = "captions"
ICE_ENV = "MIDASHENG_ICE_SERVERS"


@dataclass(frozen=True)
class WebRtcLimits:
    """How the WebRTC ingest buffers, feeds and relays one browser's stream."""

    ENV_GROUP: ClassVar[str] = "WEBRTC"

    chunk_seconds: Annotated[float, "s of audio per feed to the session"] = 0.16
    max_chunk_seconds: Annotated[float, "s, the most one feed carries when catching up"] = 1.0
    buffer_seconds: Annotated[
        float, "s of audio buffered while the encoder is slow (older audio dropped)"
    ] = 5.0
    inactivity_seconds: Annotated[float, "s without an audio frame before the peer is closed"] = 15.0
    events_block_ms: Annotated[int, "ms one Redis read of caption events waits"] = 200
    high_water_bytes: Annotated[int, "data channel backlog above which interim captions are held back"] = (
        256 * 1024
    )
    end_wait_seconds: Annotated[float, "s to wait for the last caption after a client's stop"] = 10.0
    io_threads: Annotated[
        int, "threads for blocking feed and Redis calls (0 = two per allowed session, + 4)"
    ] = 0
    max_offers_per_minute: Annotated[int, "offers one client address may make in any minute; 0 = any"] = 30
    max_media_sections: Annotated[int, "m= sections in one offer (one audio, video, data channel each)"] = 3


def parse_ice_server(spec: str) -> RTCIceServer:
    """``stun:host:port`` or ``turn:USER:PASS@host:port?transport=udp`` -> RTCIceServer."""
    spec = spec.strip()
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in ("stun", "stuns", "turn", "turns") or not rest:
        raise InvalidArgument(
            f"ICE server {spec!r} must look like stun:HOST:PORT or turn:USER:PASS@HOST:PORT"
        )
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        user, _, password = creds.partition(":")
        return RTCIceServer(urls=f"{scheme}:{host}", username=unquote(user), credential=unquote(password))
    return RTCIceServer(urls=spec)


def ice_servers_from(specs: Sequence[str] | None) -> list[RTCIceServer]:
    """ICE servers from ``--ice-server`` flags, else ``$MIDASHENG_ICE_SERVERS`` (comma-separated), else none.

    None is the right default on loopback and LANs: aiortc has no trickle ICE, so an unreachable
    STUN server would hold every answer for its timeout.
    """
    if not specs:
        specs = [s for s in os.environ.get(ICE_ENV, "").split(",") if s.strip()]
    return [parse_ice_server(s) for s in specs]


def ice_server_json(server: RTCIceServer) -> dict[str, Any]:
    out: dict[str, Any] = {"urls": server.urls}
    if server.username:
        out["username"], out["credential"] = server.username, server.credential
    return out


class AudioBuffer:
    """16 kHz mono float32 samples awaiting the encoder; holds at most ``max_samples`` (drops oldest)."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self._parts: deque[np.ndarray] = deque()
        self.size = 0

    def push(self, x: np.ndarray) -> int:
        """Append samples; returns how many old samples were dropped to stay within the cap."""
        if x.size:
            self._parts.append(x)
            self.size += x.size
        dropped = 0
        while self.size > self.max_samples:
            over = self.size - self.max_samples
            head = self._parts[0]
            if head.size <= over:
                self._parts.popleft()
                cut = head.size
            else:
                self._parts[0] = head[over:]
                cut = over
            self.size -= cut
            dropped += cut
        return dropped

    def take(self, n: int) -> np.ndarray:
        """Remove and return up to ``n`` samples from the front."""
        out: list[np.ndarray] = []
        need = min(n, self.size)
        while need > 0:
            head = self._parts[0]
            if head.size <= need:
                out.append(self._parts.popleft())
                need -= head.size
            else:
                out.append(head[:need])
                self._parts[0] = head[need:]
                need = 0
        taken = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        self.size -= taken.size
        return taken


class Peer:
    """One browser connection: its RTCPeerConnection, session, audio pipeline and caption relay."""

    def __init__(self, ingest: WebRtcIngest, pc: RTCPeerConnection) -> None:
        self.ingest = ingest
        self.pc = pc
        self.session: LiveSession | None = None
        self.channel: RTCDataChannel | None = None
        lim = ingest.limits
        self.buffer = AudioBuffer(int(lim.buffer_seconds * SAMPLE_RATE))
        self.audio_ready = asyncio.Event()
        self.last_frame = time.monotonic()
        self.frames = 0
        self.stopping = False  # the client asked to stop: no more audio, relay until the end event
        self.closed = False
        self.end_reason = ""
        self.tasks: set[asyncio.Task[None]] = set()
        # The newest held-back interim per question id ("" = the caption), in the order they came.
        self._pending_interims: dict[str, dict[str, Any]] = {}
        self.release_quota: Release = lambda: None  # the stream slot of its tenant and address

    @property
    def sid(self) -> str:
        return self.session.sid if self.session else "-"

    def spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.sid}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A peer task that dies of an unexpected error is logged and takes the peer down with it
        (instead of leaving a peer whose audio is drained into a buffer nobody reads)."""
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("peer %s: task %s failed", self.sid, task.get_name(), exc_info=task.exception())
        if not self.closed and not task.get_name().startswith("close-"):
            self.send(
                {
                    "type": "error",
                    "message": "internal error; see the gateway log",
                    "reason": "internal",
                    "fatal": True,
                }
            )
            self.spawn(self.close("error"), "close")

    # --- audio in ---------------------------------------------------------------------------------
    async def drain(self, track: MediaStreamTrack) -> None:
        """Receive every frame of the track (always, even when stopping) and buffer it at 16 kHz."""
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            self.last_frame = time.monotonic()
            self.frames += 1
            if self.stopping or self.closed:
                continue
            for out in resampler.resample(frame):  # type: ignore[arg-type]
                dropped = self.buffer.push(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
                if dropped:
                    metrics.DROPPED_CHUNKS.labels(where="webrtc").inc()
                    log.warning(
                        "session %s: encoder behind; dropped %.2f s of audio", self.sid, dropped / SAMPLE_RATE
                    )
            if self.buffer.size >= int(self.ingest.limits.chunk_seconds * SAMPLE_RATE):
                self.audio_ready.set()
        log.info("session %s: audio track ended", self.sid)
        if not self.stopping and not self.closed:
            self.spawn(self.end("track_ended"), "end")

    async def feed_loop(self) -> None:
        lim = self.ingest.limits
        chunk, most = int(lim.chunk_seconds * SAMPLE_RATE), int(lim.max_chunk_seconds * SAMPLE_RATE)
        loop = asyncio.get_running_loop()
        while not self.closed:
            await self.audio_ready.wait()
            self.audio_ready.clear()
            while self.buffer.size >= chunk and self.session and not self.stopping:
                samples = self.buffer.take(most)
                try:
                    await loop.run_in_executor(self.ingest.pool, self.session.feed, samples.tobytes())
                except MidashengError as e:
                    if self.stopping or self.closed:
                        return
                    log.warning("session %s: audio rejected: %s", self.sid, e)
                    self.send({"type": "error", "message": str(e), "reason": "audio", "fatal": True})
                    await self.close("error")
                    return

    # --- captions out -----------------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return
        ch.send(json.dumps(msg, separators=(",", ":")))

    def deliver(self, msg: dict[str, Any]) -> None:
        """Send one event; while the channel is backed up, interim captions and interim answers
        wait, the newest of each question (and of the caption) winning. Finals, alerts and the
        rest always go out."""
        ch = self.channel
        backed_up = ch is not None and ch.bufferedAmount > self.ingest.limits.high_water_bytes
        if msg["type"] == "caption":
            key = msg.get("question_id") or ""
            if not msg["is_final"]:
                self._pending_interims.pop(key, None)
                if backed_up:
                    self._pending_interims[key] = msg
                    return
            else:
                p = self._pending_interims.get(key)
                if p is not None and p["segment_id"] <= msg["segment_id"]:
                    del self._pending_interims[key]  # superseded by this final
        self.send(msg)

    def flush_pending(self) -> None:
        ch = self.channel
        if (
            self._pending_interims
            and ch is not None
            and ch.bufferedAmount <= self.ingest.limits.high_water_bytes
        ):
            held, self._pending_interims = self._pending_interims, {}
            for msg in held.values():
                self.send(msg)

    async def relay(self) -> None:
        """Caption events from Redis to the data channel, until the session's end event."""
        assert self.session is not None
        session, loop = self.session, asyncio.get_running_loop()
        block = self.ingest.limits.events_block_ms / 1000
        events = session.subscribe()
        try:
            while not self.closed:
                batch = await loop.run_in_executor(self.ingest.pool, events.wait, block)
                self.flush_pending()
                for ev in batch:
                    self.deliver(ev.to_json())
                    if isinstance(ev, EndEvent):
                        self.end_reason = self.end_reason or ev.reason.value
                        self.spawn(self._close_later(self.end_reason), "close")
                        return
        finally:
            session.gateway.hub.unsubscribe(events)

    async def _close_later(self, reason: str, grace: float = 2.0) -> None:
        """After the end event: give the client time to read it and close first."""
        await asyncio.sleep(grace)
        await self.close(reason)

    async def end(self, reason: str) -> None:
        """End gracefully (client "stop", idle, track end): feed what is buffered, finalize, let the
        relay send the last caption and the "ended" message, then close."""
        if self.stopping or self.closed or self.session is None:
            return
        self.stopping = True
        self.end_reason = self.end_reason or reason
        session, loop = self.session, asyncio.get_running_loop()
        try:
            rest = self.buffer.take(self.buffer.size)
            if rest.size:
                await loop.run_in_executor(self.ingest.pool, session.feed, rest.tobytes())
            await loop.run_in_executor(self.ingest.pool, session.finalize)
        except MidashengError as e:
            log.warning("session %s: finalizing failed: %s", self.sid, e)
            await self.close("error")
            return
        await asyncio.sleep(self.ingest.limits.end_wait_seconds)
        await self.close(reason)  # the end event did not arrive in time (or nobody relays it)

    def on_message(self, data: str | bytes) -> None:
        try:
            msg = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            msg = None
        if isinstance(msg, dict) and msg.get("type") == "stop":
            self.spawn(self.end("end_of_stream"), "end")
        elif isinstance(msg, dict) and msg.get("type") == "ping":
            self.send({"type": "pong"})
        elif isinstance(msg, dict) and msg.get("type") == "questions":
            self.spawn(self.set_questions(msg.get("questions")), "questions")
        else:
            self.send(
                {
                    "type": "error",
                    "message": 'unknown message; send {"type": "stop"} to end the stream, or '
                    '{"type": "questions", "questions": [...]} to change its questions',
                    "reason": "protocol",
                    "fatal": False,
                }
            )

    async def set_questions(self, value: object) -> None:
        """The client's new questions for its session: answered with the questions now asked, or
        a (non-fatal) error."""
        session = self.session
        try:
            if value is None:
                raise InvalidArgument(
                    'a questions message needs "questions": [{"id": "...", "text": "..."}, ...] '
                    "(an empty list clears them)"
                )
            questions = questions_from_json(value)
            if session is None or self.stopping or self.closed:
                raise FailedPrecondition("the session is ending; its questions can no longer change")
            await asyncio.get_running_loop().run_in_executor(
                self.ingest.pool, session.gateway.set_questions, session, questions
            )
        except MidashengError as e:
            self.send({"type": "error", "message": str(e), "reason": "questions", "fatal": False})
            return
        log.info("session %s: questions now %s", self.sid, ", ".join(q.id for q in questions) or "none")
        self.send({"type": "questions", "questions": questions_to_json(questions)})

    # --- lifecycle --------------------------------------------------------------------------------
    async def watchdog(self) -> None:
        """Ends a peer whose audio stopped arriving (browser gone without a close, track muted...)."""
        lim = self.ingest.limits
        while not self.closed:
            await asyncio.sleep(min(1.0, lim.inactivity_seconds / 4))
            if not self.stopping and time.monotonic() - self.last_frame > lim.inactivity_seconds:
                log.info(
                    "session %s: no audio for %.0f s; closing the peer", self.sid, lim.inactivity_seconds
                )
                self.send(
                    {
                        "type": "error",
                        "reason": "idle",
                        "fatal": False,
                        "message": f"no audio arrived for {lim.inactivity_seconds:.0f} s; the session is being "
                        "finalized and will end",
                    }
                )
                await self.end("idle")
                return

    async def close(self, reason: str) -> None:
        """Idempotent: finalize + forget the session, close the connection, stop the tasks."""
        if self.closed:
            return
        self.closed = True
        self.release_quota()
        self.end_reason = self.end_reason or reason
        self.audio_ready.set()
        loop = asyncio.get_running_loop()
        session = self.session
        if session is not None:
            try:
                await loop.run_in_executor(self.ingest.pool, session.finalize)
            except Exception:  # the encoder may be gone; the session ends either way
                log.exception("session %s: finalize on close failed", session.sid)
            self.ingest.gateway.forget(session)
            self.ingest.ended(session, self.end_reason)
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        try:
            await asyncio.wait_for(self.pc.close(), timeout=5.0)
        except (TimeoutError, Exception):
            log.exception("session %s: closing the peer connection failed", self.sid)
        self.ingest.peers.discard(self)
        log.info("session %s: peer closed (%s, %d frames)", self.sid, self.end_reason, self.frames)


class WebRtcIngest:
    """Accepts WebRTC offers for one gateway; owns every peer (closed on shutdown)."""

    def __init__(
        self,
        gateway: LiveGateway,
        ice_servers: Sequence[RTCIceServer] = (),
        limits: WebRtcLimits | None = None,
    ) -> None:
        self.gateway = gateway
        self.ice_servers = list(ice_servers)
        self.limits = limits or WebRtcLimits()
        self.peers: set[Peer] = set()
        threads = self.limits.io_threads or 2 * gateway.limits.max_sessions + 4  # started lazily, as needed
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webrtc-io")
        self.recently_ended: dict[str, tuple[float, str]] = {}  # sid -> (unix time, reason)
        self.offers = RateLimit(self.limits.max_offers_per_minute, "WebRTC offers from this address")

    def ended(self, session: LiveSession, reason: str) -> None:
        now = time.time()
        self.recently_ended[session.sid] = (now, reason)
        for sid, (t, _) in list(self.recently_ended.items()):
            if now - t > 300:
                del self.recently_ended[sid]

    def session(self, sid: str) -> LiveSession | None:
        for p in list(self.peers):  # called from other threads too
            if p.session is not None and p.session.sid == sid:
                return p.session
        return None

    async def offer(
        self, sdp: str, kind: str, settings: StreamSettings, tenant: str = "", address: str = ""
    ) -> tuple[str, str, str, str]:
        """Answer one browser offer for ``tenant``; returns (answer sdp, type, session id, the
        session's resume secret).

        Raises InvalidArgument for a bad offer or settings, ResourceExhausted at capacity.
        """
        self.offers.hit(address)  # every offer counts, good or bad
        if kind != "offer":
            raise InvalidArgument(f"type must be 'offer', got {kind!r}")
        if not isinstance(sdp, str) or not sdp.startswith("v=0"):
            raise InvalidArgument("sdp must be an SDP offer (text starting with 'v=0')")
        if "m=audio" not in sdp:
            raise InvalidArgument("the offer has no audio track; add a microphone or tab-audio track")
        check_media_sections(sdp, self.limits.max_media_sections)
        check_limits(settings, self.gateway.limits)
        lim = self.gateway.limits
        if len(self.gateway) >= lim.max_sessions:  # before any transport or socket is made
            raise ResourceExhausted(
                f"this gateway serves its maximum of {lim.max_sessions} sessions; "
                f"retry in {lim.retry_after_seconds:.0f} s",
                retry_after=lim.retry_after_seconds,
            )
        release = self.gateway.quotas.acquire(tenant, address)
        try:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers)))
        except BaseException:
            release()
            raise
        peer = Peer(self, pc)
        peer.release_quota = release
        self._wire(peer)
        loop = asyncio.get_running_loop()
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as e:  # aiortc raises ValueError and friends for malformed SDP
                raise InvalidArgument(f"the SDP offer could not be used: {e}") from e
            peer.session = await loop.run_in_executor(self.pool, self.gateway.create, settings, "", tenant)
            self.peers.add(peer)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except BaseException:
            if peer.session is not None:
                await peer.close("rejected")
            else:
                release()
                await pc.close()
            raise
        peer.last_frame = time.monotonic()
        peer.spawn(peer.feed_loop(), "feed")
        peer.spawn(peer.watchdog(), "watchdog")
        local = pc.localDescription
        return local.sdp, local.type, peer.sid, peer.session.secret

    def _wire(self, peer: Peer) -> None:
        pc = peer.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                peer.spawn(peer.drain(track), "drain")
            else:  # video (a shared tab): drain and discard, never let frames pile up
                peer.spawn(_discard(track), "discard")

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != CHANNEL_LABEL or peer.channel is not None:
                return
            peer.channel = channel
            channel.on("message", peer.on_message)
            if peer.session is not None:
                s = peer.session.settings.session
                peer.send(
                    {
                        "type": "started",
                        "session_id": peer.sid,
                        "config": {
                            "prompt": s.prompt,
                            "window_seconds": s.window_seconds,
                            "hop_seconds": s.hop_seconds,
                            "adapter": s.adapter,
                            "interim_results": s.interim_results,
                            "questions": questions_to_json(s.questions),
                        },
                    }
                )
                peer.spawn(peer.relay(), "relay")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: connection %s", peer.sid, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await peer.close(f"connection_{pc.connectionState}")

    async def shutdown(self) -> None:
        await asyncio.gather(*(p.close("shutdown") for p in list(self.peers)), return_exceptions=True)
        self.pool.shutdown(wait=False, cancel_futures=True)


def check_media_sections(sdp: str, most: int) -> None:
    """At most ``most`` media sections and at most one of each kind: every section gets its own
    transport and sockets in aiortc, so hundreds in one offer would exhaust file descriptors."""
    kinds = [line[2:].split(" ", 1)[0] for line in sdp.splitlines() if line.startswith("m=")]
    if len(kinds) > most or len(kinds) != len(set(kinds)):
        raise InvalidArgument(
            f"an offer may hold at most {most} media sections, one of each kind "
            "(audio, video, application); this one has "
            f"{len(kinds)}"
        )


async def _discard(track: MediaStreamTrack) -> None:
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return
