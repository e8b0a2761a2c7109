"""The blocking client: ``CaptionClient(target).stream(...)`` -> a :class:`LiveStream`.

    with CaptionClient("localhost:50051", api_key=key) as client:
        with client.stream(sample_rate_hz=16000, interim_results=True) as stream:
            threading.Thread(target=lambda: [stream.send(pcm) for pcm in mic()] and stream.finalize()).start()
            for event in stream:       # CaptionEvent, StreamError, and last SessionEnded
                print(event)

One background thread per stream owns the gRPC call; when the call breaks with a resumable status
it reconnects (backoff, bounded by ``ClientLimits.reconnect_seconds``), resumes after the last event
it handed out and sends the audio the server did not take, so the application sees every event
exactly once and never re-sends anything itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from services.client.core import (
    EMIT,
    END,
    RESUME,
    STARTED,
    Backpressure,
    ClientLimits,
    Event,
    Reconnects,
    StreamFailed,
    StreamState,
    StreamView,
    close_request,
    keep_alive_request,
    metadata,
    next_step,
    resume_state,
    session_config,
)
from services.errors import FailedPrecondition
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc
from services.security import ClientCredentials

log = logging.getLogger(__name__)
POLL_S = 0.1  # how often blocked loops look at the stream's state
_END = object()


class CaptionClient:
    """A connection to a gateway's public API (one gRPC channel, any number of streams)."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        credentials: ClientCredentials | None = None,
        limits: ClientLimits | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        creds = credentials or ClientCredentials()
        self.target = target
        self.limits = limits or ClientLimits()
        self._metadata = metadata(api_key or creds.token)
        # The key rides on each call's metadata; the channel itself carries none.
        self.channel = ClientCredentials(
            creds.tls, creds.ca, creds.cert, creds.key, creds.server_name
        ).channel(target, options)
        self.stub = captions_pb2_grpc.CaptionServiceStub(self.channel)

    def stream(self, config: captions_pb2.SessionConfig | None = None, **fields: object) -> LiveStream:
        """Open a live stream (``fields`` are SessionConfig's: ``sample_rate_hz``, ``prompt``...)."""
        return LiveStream(self, StreamState(session_config(config, **fields), self.limits))

    def resume(
        self,
        session_id: str,
        resume_secret: str,
        last_event_id: str = "",
        config: captions_pb2.SessionConfig | None = None,
    ) -> LiveStream:
        """Attach to an existing session (e.g. one started by a process that has since died);
        ``config`` gives the audio format when it is not 16 kHz mono LINEAR16."""
        state = resume_state(self.limits, session_id, resume_secret, last_event_id, config)
        return LiveStream(self, state)

    def caption(self, audio: bytes, prompt: str = "", timeout: float = 60.0) -> captions_pb2.CaptionResponse:
        """Caption one encoded clip (WAV, FLAC, ...) offline."""
        req = captions_pb2.CaptionRequest(encoded_audio=audio, prompt=prompt)
        resp: captions_pb2.CaptionResponse = self.stub.Caption(req, timeout=timeout, metadata=self._metadata)
        return resp

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CaptionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveStream(StreamView):
    """One live session: ``send`` audio from any thread, iterate events in another."""

    def __init__(self, client: CaptionClient, state: StreamState) -> None:
        self._client = client
        self.state = state
        self.limits = state.limits
        self._out: queue.Queue[Any] = queue.Queue(self.limits.max_queued_chunks)
        self._events: queue.Queue[Any] = queue.Queue(self.limits.max_events)
        self._closed = threading.Event()  # the application is done with the stream
        self._done = threading.Event()  # the worker has finished
        self._started = threading.Event()
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()
        self.reconnects = Reconnects(self.limits, client.target)
        self._answered = False  # the current call got SessionStarted
        self._thread = threading.Thread(target=self._run, name="midasheng-stream", daemon=True)
        self._thread.start()

    # --- the application's side -----------------------------------------------------------------

    def wait_started(self, timeout: float = 30.0) -> captions_pb2.SessionStarted:
        """Block until the server opened (or resumed) the session."""
        if not self._started.wait(timeout) or self.state.started is None:
            raise TimeoutError(f"the session did not start within {timeout:.0f} s")
        return self.state.started

    def send(self, pcm: bytes, timeout: float | None = 30.0) -> None:
        """Queue audio in the session's format; blocks while the service is behind (raises
        :class:`Backpressure` after ``timeout`` s), raises :class:`StreamFailed` once the stream failed."""
        for piece in self.state.split(pcm):
            self._put(piece, timeout)

    def keep_alive(self) -> None:
        self._put(keep_alive_request(), 5.0)

    def finalize(self, timeout: float | None = 30.0) -> None:
        """No more audio: the rest is captioned, then SessionEnded ends the iteration."""
        self._put(_END, timeout)

    def close(self) -> None:
        """End now (the open window is not captioned) and free the stream's thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            call = self._call
        if call is not None and not self._done.is_set():
            try:
                self._out.put_nowait(close_request())
            except queue.Full:
                call.cancel()
        self._thread.join(timeout=10.0)
        if self._thread.is_alive() and call is not None:
            call.cancel()
            self._thread.join(timeout=5.0)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events in order; ends after SessionEnded. ``timeout``: longest wait for the next event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._events.get(timeout=POLL_S)
            except queue.Empty:
                if self._done.is_set() and self._events.empty():
                    return  # closed by the application
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"no event within {timeout} s") from None
                continue
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            yield item

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _put(self, item: Any, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._done.is_set() or self._closed.is_set():
                raise StreamFailed("the stream is over; no more audio is taken")
            try:
                self._out.put(item, timeout=POLL_S)
                return
            except queue.Full:
                if deadline is not None and time.monotonic() > deadline:
                    raise Backpressure(
                        f"no room for audio within {timeout} s: the service is behind"
                    ) from None

    # --- the worker -----------------------------------------------------------------------------

    def _emit(self, item: Any) -> None:
        while not self._closed.is_set():
            try:
                self._events.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                err: grpc.RpcError | None = None
                try:
                    if self._attempt():
                        return
                except grpc.RpcError as e:
                    err = e
                if self._closed.is_set():
                    return
                answered, self._answered = self._answered, False
                self._closed.wait(self.reconnects.delay(err, answered, time.monotonic()))
        except (StreamFailed, FailedPrecondition) as e:
            self._emit(e)
        except Exception as e:  # never leave the reader waiting
            log.exception("stream worker failed")
            self._emit(StreamFailed(f"{type(e).__name__}: {e}"))
        finally:
            self._done.set()
            self._emit(_END)

    def _attempt(self) -> bool:
        """One call; True when the session ended (or the application closed the stream)."""
        attempt_over = threading.Event()
        resend: queue.Queue[Any] = queue.Queue()
        ready = threading.Event()

        def requests() -> Iterator[captions_pb2.StreamCaptionsRequest]:
            yield self.state.first_request()
            if not ready.wait(60.0):  # the server has not answered; the call fails on its own
                return
            while not resend.empty():
                yield resend.get_nowait()
            while not attempt_over.is_set():
                if not self.state.has_room():  # backpressure: wait for the server to encode
                    attempt_over.wait(POLL_S)
                    continue
                try:
                    item = self._out.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if item is _END:
                    yield self.state.finalize()
                elif isinstance(item, bytes):
                    yield self.state.number(item)
                else:
                    yield item  # a control message
                    if item.control.action == captions_pb2.Control.CLOSE:
                        return

        call = self._client.stub.StreamCaptions(requests(), metadata=self._client._metadata)
        with self._lock:
            self._call = call
        try:
            for resp in call:
                step = next_step(self.state, resp)
                if step.action == STARTED:
                    for r in step.resend:
                        resend.put(r)
                    ready.set()
                    self._answered = True
                    self._started.set()
                elif step.action in (EMIT, END):
                    self._emit(step.event)
                    if step.action == END:
                        return True
                elif step.action == RESUME:
                    return False
            return self._closed.is_set()  # the call ended without SessionEnded
        finally:
            attempt_over.set()
            ready.set()
            with self._lock:
                self._call = None
            call.cancel()
