"""The asyncio client: ``AsyncCaptionClient(target).stream(...)`` -> an :class:`AsyncLiveStream`.

    async with AsyncCaptionClient("localhost:50051", api_key=key) as client:
        async with client.stream(sample_rate_hz=16000, interim_results=True) as stream:
            async def feed():
                async for pcm in mic():
                    await stream.send(pcm)      # waits while the service is behind
                await stream.finalize()
            asyncio.create_task(feed())
            async for event in stream:          # CaptionEvent, StreamError, last SessionEnded
                print(event)

Same guarantees as the blocking client (:mod:`services.client.sync`): a dropped call is resumed
after the last event handed out, with the audio the server did not take sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

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
_END = object()
START_TIMEOUT_S = 60.0  # longest wait for SessionStarted on one call


class AsyncCaptionClient:
    """A connection to a gateway's public API for asyncio code."""

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
        opts = [*options, *creds.channel_options()]
        tls = creds.channel_credentials()
        self.channel = (
            grpc.aio.secure_channel(target, tls, options=opts)
            if tls is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self.stub = captions_pb2_grpc.CaptionServiceStub(self.channel)

    def stream(self, config: captions_pb2.SessionConfig | None = None, **fields: object) -> AsyncLiveStream:
        """Open a live stream (call from a running event loop)."""
        return AsyncLiveStream(self, StreamState(session_config(config, **fields), self.limits))

    def resume(
        self,
        session_id: str,
        resume_secret: str,
        last_event_id: str = "",
        config: captions_pb2.SessionConfig | None = None,
    ) -> AsyncLiveStream:
        state = resume_state(self.limits, session_id, resume_secret, last_event_id, config)
        return AsyncLiveStream(self, state)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncCaptionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncLiveStream(StreamView):
    """One live session: ``await send(...)`` audio, ``async for`` its events."""

    def __init__(self, client: AsyncCaptionClient, state: StreamState) -> None:
        self._client = client
        self.state = state
        self.limits = state.limits
        self._out: asyncio.Queue[Any] = asyncio.Queue(self.limits.max_queued_chunks)
        self._events: asyncio.Queue[Any] = asyncio.Queue(self.limits.max_events)
        self._closed = asyncio.Event()
        self._started = asyncio.Event()
        self._answered = False
        self.reconnects = Reconnects(self.limits, client.target)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="midasheng-stream")

    async def wait_started(self, timeout: float = 30.0) -> captions_pb2.SessionStarted:
        try:
            await asyncio.wait_for(self._started.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"the session did not start within {timeout:.0f} s") from None
        assert self.state.started is not None
        return self.state.started

    async def send(self, pcm: bytes, timeout: float | None = 30.0) -> None:
        """Queue audio; waits while the service is behind (:class:`Backpressure` after ``timeout`` s)."""
        for piece in self.state.split(pcm):
            await self._put(piece, timeout)

    async def keep_alive(self) -> None:
        await self._put(keep_alive_request(), 5.0)

    async def finalize(self, timeout: float | None = 30.0) -> None:
        await self._put(_END, timeout)

    async def close(self) -> None:
        """End now and wait for the stream's task."""
        if not self._closed.is_set():
            self._closed.set()
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(close_request())
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10.0)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def events(self, timeout: float | None = None) -> AsyncIterator[Event]:
        return self._iterate(timeout)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate(None)

    async def _iterate(self, timeout: float | None) -> AsyncIterator[Event]:
        while True:
            if self._task.done() and self._events.empty():
                return
            try:
                item = await asyncio.wait_for(self._events.get(), timeout)
            except TimeoutError:
                raise TimeoutError(f"no event within {timeout} s") from None
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                return
            yield item

    async def __aenter__(self) -> AsyncLiveStream:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _put(self, item: Any, timeout: float | None) -> None:
        if self._task.done() or self._closed.is_set():
            raise StreamFailed("the stream is over; no more audio is taken")
        try:
            await asyncio.wait_for(self._out.put(item), timeout)
        except TimeoutError:
            raise Backpressure(f"no room for audio within {timeout} s: the service is behind") from None

    # --- the task -------------------------------------------------------------------------------

    async def _emit(self, item: Any) -> None:
        if not self._closed.is_set():
            await self._events.put(item)

    async def _run(self) -> None:
        try:
            while not self._closed.is_set():
                err: grpc.RpcError | None = None
                try:
                    if await self._attempt():
                        return
                except grpc.RpcError as e:
                    err = e
                if self._closed.is_set():
                    return
                answered, self._answered = self._answered, False
                delay = self.reconnects.delay(err, answered, time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)
        except (StreamFailed, FailedPrecondition) as e:
            await self._emit(e)
        except Exception as e:
            log.exception("stream task failed")
            await self._emit(StreamFailed(f"{type(e).__name__}: {e}"))
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(_END)

    async def _attempt(self) -> bool:
        call = self._client.stub.StreamCaptions(metadata=self._client._metadata)
        ready = asyncio.Event()
        resend: list[captions_pb2.StreamCaptionsRequest] = []

        async def write() -> None:
            await call.write(self.state.first_request())
            await asyncio.wait_for(ready.wait(), START_TIMEOUT_S)
            for r in resend:
                await call.write(r)
            while True:
                if not self.state.has_room():  # backpressure: wait for the server to encode
                    await asyncio.sleep(0.1)
                    continue
                item = await self._out.get()
                if item is _END:
                    await call.write(self.state.finalize())
                elif isinstance(item, bytes):
                    await call.write(self.state.number(item))
                else:
                    await call.write(item)
                    if item.control.action == captions_pb2.Control.CLOSE:
                        await call.done_writing()
                        return

        writer = asyncio.get_running_loop().create_task(write())
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    if writer.done() and not writer.cancelled() and writer.exception() is not None:
                        raise writer.exception()  # type: ignore[misc]
                    return self._closed.is_set()
                step = next_step(self.state, resp)
                if step.action == STARTED:
                    resend[:] = step.resend
                    self._answered = True
                    ready.set()
                    self._started.set()
                elif step.action in (EMIT, END):
                    await self._emit(step.event)
                    if step.action == END:
                        return True
                elif step.action == RESUME:
                    return False
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError, TimeoutError):
                await writer
            call.cancel()
