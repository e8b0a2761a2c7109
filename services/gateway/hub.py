"""One reader of caption streams per gateway, shared by every open call.

Each open client (a gRPC stream, a WebRTC peer) subscribes to its session's caption stream from
a cursor. One thread reads every subscribed stream with a single blocking ``XREAD`` and hands the
new events to the subscribers, waking them. Redis sees a few commands per second per gateway
instead of one poll per call every few tens of milliseconds, and an idle call costs no CPU.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import redis

from services import metrics
from services.errors import InvalidArgument
from services.transport import keys
from services.transport.streams import Entry, StreamClient
from services.wire.events import Event, from_fields

log = logging.getLogger(__name__)
READ_BLOCK_MS = 100  # one XREAD waits this long at most (a new subscription waits no longer)
READ_COUNT = 100  # entries per stream per read
MAX_BUFFERED = 10_000  # events a slow subscriber may have waiting before the oldest are dropped


@dataclass(eq=False)
class Subscription:
    sid: str
    cursor: str  # the last event id handed over ("0-0" = from the start)
    wake: threading.Event = field(default_factory=threading.Event)
    _events: deque[Event] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    dropped: int = 0

    def take(self) -> list[Event]:
        """Every event delivered so far (in stream order), without waiting."""
        with self._lock:
            out, self._events = list(self._events), deque()
        return out

    def wait(self, timeout: float) -> list[Event]:
        """Events, waiting up to ``timeout`` seconds for the first ones (or for ``wake`` to be set)."""
        if not self._events:
            self.wake.wait(timeout)
        self.wake.clear()
        return self.take()

    def _deliver(self, events: list[Event]) -> None:
        with self._lock:
            self._events.extend(events)
            while len(self._events) > MAX_BUFFERED:
                self._events.popleft()
                self.dropped += 1
                metrics.DROPPED_CHUNKS.labels(where="caption_events").inc()
            self.cursor = events[-1].event_id
        self.wake.set()


class EventHub:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.streams = StreamClient(client)
        self._subs: dict[str, list[Subscription]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="caption-hub", daemon=True)
        self._thread.start()

    def subscribe(self, sid: str, cursor: str = "0-0", wake: threading.Event | None = None) -> Subscription:
        """Events of session ``sid`` after ``cursor``; ``wake`` (shared with other sources of the
        caller's work) is set whenever events arrive."""
        sub = Subscription(sid, cursor or "0-0", wake or threading.Event())
        with self._lock:
            self._subs.setdefault(sid, []).append(sub)
        self._changed.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.sid, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subs.pop(sub.sid, None)

    def close(self) -> None:
        self._stop.set()
        self._changed.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                cursors = {
                    keys.session_captions(sid): min((s.cursor for s in subs), key=_id_key)
                    for sid, subs in self._subs.items()
                }
                sid_of = {keys.session_captions(sid): sid for sid in self._subs}
            if not cursors:
                self._changed.wait(1.0)
                self._changed.clear()
                continue
            try:  # one XREAD (one per hash slot on a Redis Cluster)
                entries = self.streams.read(cursors, count=READ_COUNT, block_ms=READ_BLOCK_MS)
            except redis.RedisError as e:  # Redis away: subscribers see no events meanwhile
                log.warning("reading caption streams failed: %s; retrying", e)
                self._stop.wait(0.5)
                continue
            by_stream: dict[str, list[Entry]] = {}
            for entry in entries:
                by_stream.setdefault(entry.stream, []).append(entry)
            for stream, items in by_stream.items():
                sid = sid_of[stream]
                events = []
                for entry in items:
                    try:
                        events.append(from_fields(entry.id, {k.encode(): v for k, v in entry.fields.items()}))
                    except InvalidArgument as e:  # no writer makes these: say so, skip it
                        log.error("session %s: skipping caption-stream entry: %s", sid, e)
                with self._lock:
                    subs = list(self._subs.get(sid, []))
                for sub in subs:
                    mine = [e for e in events if _id_key(e.event_id) > _id_key(sub.cursor)]
                    if mine:
                        sub._deliver(mine)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
