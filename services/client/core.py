"""What the sync and asyncio clients share: the resume cursor, the resend buffer, reconnect policy.

A live stream survives a dropped connection (a gateway restart, a network blip) because the client
keeps three things: the session id and its resume secret (from ``SessionStarted``), the id of the
last event it handed to the application (``resume_after_event_id``), and every audio chunk the
server may not have taken yet (``SessionStarted.last_seq`` on resume says where to go on from).
Chunks leave the resend buffer once the server reports it encoded them
(``CaptionEvent.audio_processed_seconds``); while the buffer holds ``max_unacked_seconds`` the
client takes no more audio, so a sender faster than the service is slowed down (backpressure)
instead of growing memory.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import Annotated, ClassVar

import grpc

from services.constants import SAMPLE_RATE
from services.errors import ConfigError, FailedPrecondition
from services.pb.midasheng.v1 import captions_pb2

log = logging.getLogger(__name__)

Event = (
    captions_pb2.CaptionEvent | captions_pb2.AlertEvent | captions_pb2.StreamError | captions_pb2.SessionEnded
)
"""What a stream yields: captions (and answers), alerts, non-fatal errors, and last the end."""

RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # the gateway went away or is draining
        grpc.StatusCode.CANCELLED,  # the server cut the call (not the application: it closed the stream)
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # refused for now; retried after the server's hint
        grpc.StatusCode.UNKNOWN,  # a connection torn down mid-message
    }
)
RETRY_AFTER_MS = "retry-after-ms"
BYTES_PER_SAMPLE = {
    captions_pb2.LINEAR16: 2,
    captions_pb2.FLOAT32: 4,
    captions_pb2.AUDIO_ENCODING_UNSPECIFIED: 2,
}


class StreamFailed(Exception):
    """The stream cannot go on: a non-resumable status, or reconnecting took too long."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class Backpressure(TimeoutError):
    """``send`` waited ``timeout`` seconds for room: the service is not keeping up with the audio."""


@dataclass(frozen=True)
class ClientLimits:
    """How much a live stream holds and how long it tries to reconnect."""

    ENV_GROUP: ClassVar[str] = "CLIENT"

    max_unacked_seconds: Annotated[float, "s of audio kept for a resend until the server encoded it"] = 60.0
    max_queued_chunks: Annotated[int, "chunks send() queues before it blocks"] = 64
    max_events: Annotated[int, "events received and not yet read before reading from the server pauses"] = (
        1024
    )
    chunk_seconds: Annotated[float, "s of audio per AudioChunk (send() splits larger pieces)"] = 0.1
    reconnect_seconds: Annotated[float, "s one outage may last before the stream fails"] = 60.0
    backoff_base_seconds: Annotated[float, "first wait before reconnecting"] = 0.2
    backoff_cap_seconds: Annotated[float, "longest wait between reconnects"] = 5.0

    def __post_init__(self) -> None:
        if min(self.max_queued_chunks, self.max_events) < 1 or not all(
            math.isfinite(x) and x > 0
            for x in (
                self.max_unacked_seconds,
                self.chunk_seconds,
                self.reconnect_seconds,
                self.backoff_base_seconds,
                self.backoff_cap_seconds,
            )
        ):
            raise ConfigError("ClientLimits: every limit must be positive (and finite).")


def backoff(attempt: int, limits: ClientLimits) -> float:
    """Exponential backoff with full jitter: attempt 0, 1, 2... waits up to base, 2 base, 4 base..."""
    return random.uniform(0, min(limits.backoff_cap_seconds, limits.backoff_base_seconds * 2**attempt))


def status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Code and details of a failed call (sync or asyncio); UNAVAILABLE when it carries none."""
    code, details = getattr(err, "code", None), getattr(err, "details", None)
    if not callable(code):
        return grpc.StatusCode.UNAVAILABLE, str(err)
    return code(), (details() if callable(details) else "") or ""


def retry_after(err: grpc.RpcError | None) -> float | None:
    """The server's ``retry-after-ms`` hint of a RESOURCE_EXHAUSTED answer, in seconds."""
    get = getattr(err, "trailing_metadata", None)
    trailers = get() if callable(get) else None
    for key, value in trailers or ():
        if key == RETRY_AFTER_MS:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


class Reconnects:
    """When to try again after a call broke, and when to give up (shared by both clients)."""

    def __init__(self, limits: ClientLimits, target: str) -> None:
        self.limits = limits
        self.target = target
        self.count = 0  # reconnects so far
        self._since: float | None = None  # start of the current outage
        self._attempt = 0

    def delay(self, err: grpc.RpcError | None, answered: bool, now: float) -> float:
        """Seconds to wait before the next call; raises :class:`StreamFailed` when there is none.
        ``answered``: the broken call had opened the session (an outage starts afresh)."""
        code, details = status_of(err) if err is not None else (grpc.StatusCode.UNAVAILABLE, "ended early")
        if code not in RESUMABLE:
            raise StreamFailed(f"{code.name}: {details}", code)
        if answered:
            self._since, self._attempt = None, 0
        self._since = self._since if self._since is not None else now
        if now - self._since > self.limits.reconnect_seconds:
            raise StreamFailed(
                f"could not reach {self.target} for {self.limits.reconnect_seconds:.0f} s ({code.name}: {details})",
                code,
            )
        wait = retry_after(err) or backoff(self._attempt, self.limits)
        self._attempt += 1
        self.count += 1
        log.info("stream call ended (%s); reconnecting in %.2f s", code.name, wait)
        return wait


def session_config(config: captions_pb2.SessionConfig | None, **fields: object) -> captions_pb2.SessionConfig:
    """``config`` or a SessionConfig of ``fields`` (the proto's names: ``sample_rate_hz=16000``...)."""
    if config is not None and fields:
        raise ConfigError("pass either a SessionConfig or its fields, not both")
    if config is None:
        try:
            config = captions_pb2.SessionConfig(**fields)  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad session config: {e}") from e
    if config.session_id or config.resume_after_event_id:
        raise ConfigError("start a new stream without session_id; use resume(...) to resume one")
    return config


@dataclass(frozen=True)
class _Chunk:
    seq: int
    data: bytes
    end_seconds: float  # stream time at the end of this chunk


class StreamState:
    """The resume cursor and resend buffer of one live stream (thread-safe)."""

    def __init__(
        self,
        config: captions_pb2.SessionConfig,
        limits: ClientLimits,
        session_id: str = "",
        resume_secret: str = "",
        last_event_id: str = "",
    ) -> None:
        self.config = config
        self.limits = limits
        self.session_id = session_id
        self.resume_secret = resume_secret
        self.last_event_id = last_event_id
        self.started: captions_pb2.SessionStarted | None = None
        rate = config.sample_rate_hz or SAMPLE_RATE
        self.frame_bytes = (config.channels or 1) * BYTES_PER_SAMPLE.get(config.encoding, 2)
        self.bytes_per_second = rate * self.frame_bytes
        self._lock = threading.Lock()
        self._unacked: deque[_Chunk] = deque()
        self._unacked_bytes = 0
        self._next_seq = 1
        self._sent_seconds = 0.0
        self._pending = b""  # bytes short of a whole frame, held for the next send
        self.finalize_requested = False

    # --- requests ---------------------------------------------------------------------------------

    def first_request(self) -> captions_pb2.StreamCaptionsRequest:
        """The config of a new session, or the resume of this one."""
        if not self.session_id:
            return captions_pb2.StreamCaptionsRequest(config=self.config)
        return captions_pb2.StreamCaptionsRequest(
            config=captions_pb2.SessionConfig(
                session_id=self.session_id,
                resume_secret=self.resume_secret,
                resume_after_event_id=self.last_event_id,
            )
        )

    def split(self, data: bytes) -> list[bytes]:
        """Whole-frame pieces of ``chunk_seconds`` (a partial frame waits for the next call)."""
        data = self._pending + data
        whole = len(data) - len(data) % self.frame_bytes
        self._pending = data[whole:]
        step = max(self.frame_bytes, int(self.limits.chunk_seconds * self.bytes_per_second))
        step -= step % self.frame_bytes
        return [data[k : min(k + step, whole)] for k in range(0, whole, step)]

    def finalize(self) -> captions_pb2.StreamCaptionsRequest:
        """The FINALIZE request; remembered, so a resumed call asks for it again."""
        self.finalize_requested = True
        return finalize_request()

    def has_room(self) -> bool:
        with self._lock:
            return self._unacked_bytes < self.limits.max_unacked_seconds * self.bytes_per_second

    def number(self, data: bytes) -> captions_pb2.StreamCaptionsRequest:
        """Give a chunk its seq and keep it until the server has encoded it."""
        with self._lock:
            self._sent_seconds += len(data) / self.bytes_per_second
            chunk = _Chunk(self._next_seq, data, self._sent_seconds)
            self._next_seq += 1
            self._unacked.append(chunk)
            self._unacked_bytes += len(data)
        return captions_pb2.StreamCaptionsRequest(
            audio=captions_pb2.AudioChunk(data=chunk.data, seq=chunk.seq)
        )

    # --- responses --------------------------------------------------------------------------------

    def on_started(self, started: captions_pb2.SessionStarted) -> list[captions_pb2.StreamCaptionsRequest]:
        """Record the session; returns the chunks to send again (those after ``last_seq``)."""
        self.started = started
        if not self.session_id:
            self.session_id = started.session_id
            self.resume_secret = started.resume_secret
        with self._lock:
            while self._unacked and self._unacked[0].seq <= started.last_seq:
                self._unacked_bytes -= len(self._unacked.popleft().data)
            first = self._unacked[0].seq if self._unacked else self._next_seq
            if started.resumed and started.last_seq + 1 < first:
                raise FailedPrecondition(
                    f"the server has audio up to chunk {started.last_seq}, the client kept only from "
                    f"chunk {first}: audio between them is lost (raise ClientLimits.max_unacked_seconds)"
                )
            return [
                captions_pb2.StreamCaptionsRequest(audio=captions_pb2.AudioChunk(data=c.data, seq=c.seq))
                for c in self._unacked
            ]

    def on_event(self, event: captions_pb2.CaptionEvent | captions_pb2.AlertEvent) -> bool:
        """A caption or alert arrived: move the cursor, let go of encoded audio. False for a repeat."""
        if event.event_id and event.event_id == self.last_event_id:
            return False
        if event.event_id:
            self.last_event_id = event.event_id
        if isinstance(event, captions_pb2.AlertEvent):
            return True
        with self._lock:
            done = event.audio_processed_seconds
            while self._unacked and self._unacked[0].end_seconds <= done + 1e-6:
                self._unacked_bytes -= len(self._unacked.popleft().data)
        return True

    @property
    def unacked_chunks(self) -> int:
        with self._lock:
            return len(self._unacked)


def finalize_request() -> captions_pb2.StreamCaptionsRequest:
    return captions_pb2.StreamCaptionsRequest(
        control=captions_pb2.Control(action=captions_pb2.Control.FINALIZE)
    )


def close_request() -> captions_pb2.StreamCaptionsRequest:
    return captions_pb2.StreamCaptionsRequest(control=captions_pb2.Control(action=captions_pb2.Control.CLOSE))


def keep_alive_request() -> captions_pb2.StreamCaptionsRequest:
    return captions_pb2.StreamCaptionsRequest(
        control=captions_pb2.Control(action=captions_pb2.Control.KEEP_ALIVE)
    )


STARTED, EMIT, RESUME, END, SKIP = "started", "emit", "resume", "end", "skip"


@dataclass(frozen=True)
class Step:
    """What a stream does with one response (the same for both clients)."""

    action: str  # STARTED (send ``resend``), EMIT / END (hand ``event`` over; END: done), RESUME, SKIP
    event: Event | None = None
    resend: tuple[captions_pb2.StreamCaptionsRequest, ...] = ()


def next_step(state: StreamState, resp: captions_pb2.StreamCaptionsResponse) -> Step:
    kind = resp.WhichOneof("response")
    if kind == "started":
        again = state.on_started(resp.started)
        if state.finalize_requested:  # asked for before the call broke: ask again
            again.append(finalize_request())
        return Step(STARTED, resend=tuple(again))
    if kind in ("caption", "alert"):
        event = resp.caption if kind == "caption" else resp.alert
        return Step(EMIT, event) if state.on_event(event) else Step(SKIP)
    if kind == "error":
        return Step(EMIT, resp.error)
    if kind == "ended":
        if resp.ended.reason == captions_pb2.SessionEnded.SERVER_SHUTDOWN:
            return Step(RESUME)  # resumable through another gateway
        return Step(END, resp.ended)
    return Step(SKIP)


def resume_state(
    limits: ClientLimits,
    session_id: str,
    resume_secret: str,
    last_event_id: str,
    config: captions_pb2.SessionConfig | None,
) -> StreamState:
    """The state of a stream that attaches to an existing session."""
    return StreamState(
        config or captions_pb2.SessionConfig(), limits, session_id, resume_secret, last_event_id
    )


class StreamView:
    """What both stream classes tell about their session."""

    state: StreamState

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def resume_secret(self) -> str:
        return self.state.resume_secret

    @property
    def last_event_id(self) -> str:
        return self.state.last_event_id


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
