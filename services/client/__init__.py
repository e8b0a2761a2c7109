"""Python client of the public API: live streams that survive reconnects, blocking or asyncio.

- :class:`CaptionClient` / :class:`LiveStream` (threads) and :class:`AsyncCaptionClient` /
  :class:`AsyncLiveStream` (asyncio) stream audio and yield events: ``CaptionEvent``,
  ``StreamError`` and last ``SessionEnded`` (the messages of ``midasheng/v1/captions.proto``).
- A dropped call is resumed on its own (``ClientLimits.reconnect_seconds``), after the last event
  handed out and with the audio the server did not take: no event is lost or repeated.
- ``send`` waits while the service is behind (:class:`Backpressure` after its timeout).

Guide: ``docs/client.md``.
"""

from services.client.aio import AsyncCaptionClient, AsyncLiveStream
from services.client.core import Backpressure, ClientLimits, Event, StreamFailed
from services.client.sync import CaptionClient, LiveStream

__all__ = [
    "AsyncCaptionClient",
    "AsyncLiveStream",
    "Backpressure",
    "CaptionClient",
    "ClientLimits",
    "Event",
    "LiveStream",
    "StreamFailed",
]
