"""Public gRPC API (midasheng.v1.CaptionService): StreamCaptions, Caption, BatchCaption.

StreamCaptions runs one loop per call: drain the client's messages (read by a helper thread
into a bounded queue), feed audio to the session, relay new caption events from Redis. The
first message must be a SessionConfig; a client that sends nothing gets DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
import numpy as np

from services import rpc
from services.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MidashengError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.gateway.live import GatewayLimits, LiveGateway, LiveSession
from services.gateway.quotas import peer_host
from services.pb.midasheng.v1 import (
    captions_pb2,
    captions_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    lm_pb2_grpc,
)
from services.security import CAPTION, INSECURE, STREAM, Authenticator, ClientCredentials
from services.wire.events import CaptionEvent, EndEvent, EndReason, ErrorEvent, Event
from services.wire.limits import check_batch_size, check_caption_request
from services.wire.settings import questions_from_pb, settings_from_pb, settings_to_pb

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE = captions_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name
WAKE_S = 0.5  # a call with nothing to do checks its timers this often
END_TIMEOUT_S = 120.0  # after the audio ended, the longest wait for the LM's end marker
REQUEST_QUEUE = 64  # client messages buffered per stream before back-pressure
# grpc reports a cancelled stream to the request iterator as an ordinary end of messages when the
# empty read completes before the cancellation does; both come from the same completion-queue
# thread, back to back, so an end not followed by termination within this long is a real half-close.
HALF_CLOSE_GRACE_S = 0.25
RPC_TIMEOUT_S = 30.0
EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")  # a caption stream entry id (the resume cursor)


class GrpcEncoderLink:
    """EncoderLink over gRPC with a timeout on every call; its failures become named errors."""

    def __init__(
        self, target: str, timeout: float = RPC_TIMEOUT_S, credentials: ClientCredentials = INSECURE
    ) -> None:
        self.target = target
        self.channel = rpc.internal_channel(target, credentials)
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.channel)
        self.timeout = timeout

    def _call(self, method: Any, request: Any, sid: str) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise encoder_error(e, sid, self.target) from e

    def open(self, sid: str, emit_seconds: float, reattach_only: bool = False) -> tuple[int, bool]:
        r = self._call(
            self.stub.OpenSession,
            encoder_pb2.OpenSessionRequest(
                session_id=sid, emit_interval_seconds=emit_seconds, reattach_only=reattach_only
            ),
            sid,
        )
        return int(r.last_seq), bool(r.reattached)

    def push(
        self, sid: str, seq: int, samples: np.ndarray, end_of_stream: bool = False, first_seq: int = 0
    ) -> None:
        self._call(
            self.stub.PushAudio,
            encoder_pb2.PushAudioRequest(
                session_id=sid,
                seq=seq,
                format=encoder_pb2.SAMPLE_FORMAT_FLOAT32,
                data=np.ascontiguousarray(samples, dtype="<f4").tobytes(),
                end_of_stream=end_of_stream,
                first_seq=first_seq,
            ),
            sid,
        )

    def close(self, sid: str, flush: bool) -> None:
        try:
            self._call(
                self.stub.CloseSession, encoder_pb2.CloseSessionRequest(session_id=sid, flush=flush), sid
            )
        except NotFound:
            pass

    def shutdown(self) -> None:
        self.channel.close()


def encoder_error(e: grpc.RpcError, sid: str, target: str) -> MidashengError:
    """What a failed encoder call means to the gateway's client (the encoder's address and its
    transport details go to the log, not to the client)."""
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else str(e)) or code.name
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(f"the encoder holds no session {sid}: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers = dict(e.trailing_metadata() or ()) if isinstance(e, grpc.Call) else {}
        retry_ms = trailers.get(rpc.RETRY_AFTER_MS)
        return ResourceExhausted(details, retry_after=int(retry_ms) / 1000 if retry_ms else None)
    log.warning("encoder service at %s failed for session %s: %s: %s", target, sid, code.name, details)
    if code is grpc.StatusCode.UNAVAILABLE and details == rpc.REDIS_UNAVAILABLE:
        return Unavailable("the encoder service cannot reach Redis")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unavailable(f"the encoder service did not answer ({code.name})")
    return Unavailable(f"the encoder service failed ({code.name}); see the gateway log")


def limits_pb(lim: GatewayLimits) -> captions_pb2.ServerLimits:
    return captions_pb2.ServerLimits(
        max_chunk_bytes=lim.max_chunk_bytes,
        max_session_seconds=lim.max_session_seconds,
        idle_timeout_seconds=lim.idle_timeout_seconds,
        resume_retention_seconds=lim.resume_retention_seconds,
        max_prompt_chars=lim.max_prompt_chars,
        max_new_tokens=lim.max_new_tokens,
        max_channels=lim.max_channels,
        min_sample_rate_hz=lim.min_sample_rate_hz,
        max_sample_rate_hz=lim.max_sample_rate_hz,
    )


_END = object()  # the client half-closed its request stream: flush and finish
_DROPPED = object()  # the connection broke: keep the session for a resume


@dataclass
class _Relay:
    """Where one call's relay of a session's caption stream stands."""

    cursor: str  # the last event id relayed ("0-0" = none)
    client_done: bool = False  # the client half-closed
    finished: bool = False  # the end was relayed
    last_event: float = field(default_factory=time.monotonic)
    last_caption: str = ""  # the last caption's event id (SessionEnded.last_event_id)

    def __post_init__(self) -> None:
        self.last_caption = self.cursor if self.cursor != "0-0" else ""

    def response(self, ev: Event, end_reason: EndReason | None) -> captions_pb2.StreamCaptionsResponse:
        """The response for the next event; ``end_reason`` (a gateway's idle timeout) overrides the end's."""
        self.cursor, self.last_event = ev.event_id, time.monotonic()
        if isinstance(ev, CaptionEvent):
            self.last_caption = ev.event_id
        elif isinstance(ev, EndEvent):
            self.finished = True
            if end_reason is not None:
                ev = replace(ev, reason=end_reason)
            return ev.to_pb(self.last_caption)
        return ev.to_pb()


@dataclass
class CaptionServicer(captions_pb2_grpc.CaptionServiceServicer):
    gateway: LiveGateway
    lm_target: str | None = None
    auth: Authenticator = field(default_factory=Authenticator)
    lm_credentials: ClientCredentials = INSECURE

    def __post_init__(self) -> None:
        self._lm_channel = (
            rpc.internal_channel(self.lm_target, self.lm_credentials) if self.lm_target else None
        )
        self._lm = lm_pb2_grpc.LMServiceStub(self._lm_channel) if self._lm_channel else None

    def close(self) -> None:
        if self._lm_channel is not None:
            self._lm_channel.close()

    @rpc.streaming
    def StreamCaptions(
        self, request_iterator: Iterator[captions_pb2.StreamCaptionsRequest], context: grpc.ServicerContext
    ) -> Iterator[captions_pb2.StreamCaptionsResponse]:
        principal = self.auth.principal(context)
        release = self.gateway.quotas.acquire(principal.tenant, peer_host(context.peer()))
        if not context.add_callback(release):
            release()
            return  # the call already ended
        inbox: queue.Queue[object] = queue.Queue(maxsize=REQUEST_QUEUE)
        terminated = threading.Event()
        wake = threading.Event()  # set by the client's messages and by new caption events
        if not context.add_callback(terminated.set):
            return  # the call already ended
        reader = threading.Thread(
            target=_pump, args=(request_iterator, inbox, terminated, wake), name="stream-reader", daemon=True
        )
        reader.start()
        limits = self.gateway.limits
        try:
            first = inbox.get(timeout=limits.first_message_timeout_seconds)
        except queue.Empty as e:
            raise DeadlineExceeded(
                f"no SessionConfig received within {limits.first_message_timeout_seconds:.0f} s of opening the stream"
            ) from e
        if first is _END or first is _DROPPED:
            return
        if isinstance(first, BaseException):
            raise first
        assert isinstance(first, captions_pb2.StreamCaptionsRequest)
        if first.WhichOneof("request") != "config":
            raise FailedPrecondition("the first message of StreamCaptions must be a SessionConfig")
        cfg = first.config
        if cfg.session_id:  # resume: replay events after resume_after_event_id (all when empty)
            if cfg.resume_after_event_id and not EVENT_ID.match(cfg.resume_after_event_id):
                raise InvalidArgument("resume_after_event_id must be an event_id this server sent (MS-SEQ)")
            session = self.gateway.resume(cfg.session_id, cfg.resume_secret, principal)
            cursor = cfg.resume_after_event_id or "0-0"
        else:
            session = self.gateway.create(settings_from_pb(cfg), tenant=principal.tenant)
            cursor = "0-0"
        generation = session.generation
        try:  # a call cancelled right here must not keep the session's slot for ever
            yield captions_pb2.StreamCaptionsResponse(
                started=captions_pb2.SessionStarted(
                    session_id=session.sid,
                    effective_config=settings_to_pb(session.settings, session.sid, cursor),
                    limits=limits_pb(limits),
                    resumed=session.resumed,
                    last_seq=session.audio_seq,
                    resume_secret="" if cfg.session_id else session.secret,
                )
            )
        except BaseException:
            self.gateway.detach(session, generation)  # kept for a resume, then reaped
            raise
        yield from self._relay(session, inbox, cursor, context, generation, wake)

    def _relay(
        self,
        session: LiveSession,
        inbox: queue.Queue[object],
        cursor: str,
        context: grpc.ServicerContext,
        generation: int,
        wake: threading.Event,
    ) -> Iterator[captions_pb2.StreamCaptionsResponse]:
        """Until the session's end event (or the client goes away): take the client's messages,
        watch the idle timer, relay caption events. Sleeps until a message or an event arrives."""
        relay = _Relay(cursor)
        events = session.subscribe(cursor, wake)
        try:
            while True:
                if not self._drain_inbox(session, inbox, relay, generation):
                    return  # dropped, or superseded by a resume: finally detaches
                idle = self._check_idle(session)
                if idle is not None:
                    yield idle.to_pb()
                for ev in events.wait(WAKE_S):
                    yield relay.response(ev, session.end_reason)
                    if relay.finished:
                        return
                if session.ended and time.monotonic() - relay.last_event > END_TIMEOUT_S:
                    relay.finished = True
                    yield from self._no_caption_worker(session, relay)
                    return
                if not context.is_active():
                    return
        finally:
            self.gateway.hub.unsubscribe(events)
            if relay.finished or session.ended and relay.client_done:
                if generation == session.generation:
                    self.gateway.forget(session)
            else:
                self.gateway.detach(session, generation)

    def _drain_inbox(
        self, session: LiveSession, inbox: queue.Queue[object], relay: _Relay, generation: int
    ) -> bool:
        """Handle every message the client sent so far; False once this call no longer owns the
        session (the connection dropped, or a newer call resumed it)."""
        while not relay.client_done:
            try:
                item = inbox.get_nowait()
            except queue.Empty:
                return True
            if item is _DROPPED or generation != session.generation:
                return False
            if item is _END:
                relay.client_done = True  # half-close: flush what was sent
                session.finalize()
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, captions_pb2.StreamCaptionsRequest)
                try:
                    self._handle(session, item)
                except Unavailable as e:
                    raise Unavailable(
                        f"{e}; session {session.sid} can be resumed (send from "
                        f"SessionStarted.last_seq + 1) once it is back"
                    ) from e
        return True

    def _check_idle(self, session: LiveSession) -> ErrorEvent | None:
        """Finalize a session that got no audio or keep-alive for the idle timeout, or no audio
        (keep-alives or not) for ``max_silence_seconds``; say so once."""
        lim = self.gateway.limits
        now = time.monotonic()
        if session.ended:
            return None
        if now - session.last_activity > lim.idle_timeout_seconds:
            message = f"no audio or keep-alive for {lim.idle_timeout_seconds:.0f} s"
        elif lim.max_silence_seconds > 0 and now - session.last_audio > lim.max_silence_seconds:
            message = (
                f"no audio for {lim.max_silence_seconds:.0f} s (keep-alives do not hold a session for ever)"
            )
        else:
            return None
        log.info("session %s: %s; finalizing", session.sid, message)
        session.end_reason = EndReason.IDLE
        session.finalize()
        return ErrorEvent(
            message=f"{message}; the session is being finalized",
            reason="IDLE_TIMEOUT",
            fatal=False,
            code="DEADLINE_EXCEEDED",
        )

    def _no_caption_worker(
        self, session: LiveSession, relay: _Relay
    ) -> Iterator[captions_pb2.StreamCaptionsResponse]:
        error = ErrorEvent(
            message=f"no caption worker finished the session within {END_TIMEOUT_S:.0f} s",
            reason="NO_CAPTION_WORKER",
            fatal=True,
            code="UNAVAILABLE",
        )
        yield error.to_pb()
        yield EndEvent(EndReason.ERROR, session.seconds).to_pb(relay.last_caption)

    def _handle(self, session: LiveSession, req: captions_pb2.StreamCaptionsRequest) -> None:
        kind = req.WhichOneof("request")
        if kind == "audio":
            session.feed(req.audio.data, req.audio.seq)
        elif kind == "control":
            action = req.control.action
            if action == captions_pb2.Control.KEEP_ALIVE:
                session.touch()
            elif action == captions_pb2.Control.FINALIZE:
                session.finalize()
            elif action == captions_pb2.Control.CLOSE:
                session.close()
            else:
                raise InvalidArgument(f"unknown control action {action}")
        elif kind == "set_questions":
            self.gateway.set_questions(session, questions_from_pb(req.set_questions.questions))
        elif kind == "config":
            raise InvalidArgument("SessionConfig may only be the first message of a stream")
        else:
            raise InvalidArgument("empty StreamCaptionsRequest")

    def _lm_stub(self) -> lm_pb2_grpc.LMServiceStub:
        if self._lm is None:
            raise FailedPrecondition("this gateway has no LM service configured for offline captions")
        return self._lm

    @rpc.unary
    def Caption(
        self, request: captions_pb2.CaptionRequest, context: grpc.ServicerContext
    ) -> captions_pb2.CaptionResponse:
        check_caption_request(request)  # before it costs the LM anything
        return _forward(self._lm_stub().Caption, request, context)

    @rpc.unary
    def BatchCaption(
        self, request: captions_pb2.BatchCaptionRequest, context: grpc.ServicerContext
    ) -> captions_pb2.BatchCaptionResponse:
        """Items that break the documented limits get their own INVALID_ARGUMENT here; the rest
        go to the LM service, and the results are put back in the request's order."""
        check_batch_size(len(request.items))
        refused: dict[int, captions_pb2.ItemError] = {}
        for i, item in enumerate(request.items):
            try:
                check_caption_request(item)
            except InvalidArgument as e:
                refused[i] = captions_pb2.ItemError(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=str(e)
                )
        if not refused:
            return _forward(self._lm_stub().BatchCaption, request, context)
        index = [i for i in range(len(request.items)) if i not in refused]
        forwarded = captions_pb2.BatchCaptionResponse()
        if index:
            sub = captions_pb2.BatchCaptionRequest(items=[request.items[i] for i in index])
            forwarded = _forward(self._lm_stub().BatchCaption, sub, context)
        results = {index[r.index]: r for r in forwarded.results}  # back to the request's positions
        out = captions_pb2.BatchCaptionResponse(total_ms=forwarded.total_ms)
        for i, item in enumerate(request.items):
            if i in refused:
                out.results.append(
                    captions_pb2.BatchCaptionResult(index=i, request_id=item.request_id, error=refused[i])
                )
            else:
                r = results[i]
                r.index = i
                out.results.append(r)
        return out


# The scope each public method needs (services.security.AuthInterceptor).
METHOD_SCOPES = {
    f"/{SERVICE}/StreamCaptions": STREAM,
    f"/{SERVICE}/Caption": CAPTION,
    f"/{SERVICE}/BatchCaption": CAPTION,
}


def _forward(method: Callable[..., T], request: object, context: grpc.ServicerContext) -> T:
    """The LM service's answer; its errors keep their status and message (rpc.unary passes a failed
    call's status on)."""
    return method(request, timeout=max(1.0, context.time_remaining() or 120.0))


def _pump(
    requests: Iterator[object], inbox: queue.Queue[object], terminated: threading.Event, wake: threading.Event
) -> None:
    """Reads the client's messages into the bounded inbox (blocks when it is full: back-pressure).

    ``terminated`` is set when the call ends; an end of messages that turns out to be a
    cancellation is a dropped connection (the session stays resumable), not a half-close."""
    try:
        for req in requests:
            inbox.put(req, timeout=300)
            wake.set()
        if terminated.wait(HALF_CLOSE_GRACE_S):
            _last(inbox, wake, _DROPPED)
            return
        inbox.put(_END, timeout=300)
        wake.set()
    except grpc.RpcError:
        _last(inbox, wake, _DROPPED)  # the client vanished: the session waits for a resume
    except queue.Full:
        _last(inbox, wake, MidashengError("the stream's message queue stayed full for 300 s"))
    except Exception as e:  # malformed frames and the like end the call with that error
        _last(inbox, wake, e)


def _last(inbox: queue.Queue[object], wake: threading.Event, item: object) -> None:
    """The reader's final word; dropped when nobody takes messages any more (the call is gone)."""
    with contextlib.suppress(queue.Full):
        inbox.put(item, timeout=5)
    wake.set()
