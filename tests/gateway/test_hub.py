"""The gateway's caption-stream hub: one reader for every open call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from services.gateway.hub import READ_BLOCK_MS, EventHub
from services.transport.streams import StreamClient
from services.wire.events import CaptionEvent, CaptionStream, EndEvent, EndReason


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def caption(seg: int) -> CaptionEvent:
    return CaptionEvent(seg, 0, seg * 10.0, seg * 10.0 + 10, f"caption {seg}", True)


def test_subscribers_get_their_own_events_from_their_cursor_and_are_woken(client: redis.Redis) -> None:
    stream = CaptionStream(StreamClient(client), maxlen=100)
    first = stream.append("a", caption(0))
    hub = EventHub(client)
    try:
        wake = threading.Event()
        a_all = hub.subscribe("a", "0-0")
        a_late = hub.subscribe("a", first, wake)  # resumed after the first event
        b = hub.subscribe("b")
        got = a_all.wait(5)
        assert [e.event_id for e in got] == [first]
        stream.append("a", caption(1))
        stream.append("b", EndEvent(EndReason.END_OF_STREAM, 3.0))
        assert wake.wait(5)
        late = a_late.wait(5)
        assert [e.segment_id for e in late if isinstance(e, CaptionEvent)] == [1]
        assert [e.segment_id for e in a_all.wait(5) if isinstance(e, CaptionEvent)] == [1]
        assert [type(e) for e in b.wait(5)] == [EndEvent]
        hub.unsubscribe(a_all)
        stream.append("a", caption(2))
        assert [e.segment_id for e in a_late.wait(5) if isinstance(e, CaptionEvent)] == [2]
        assert a_all.take() == []  # nothing for the one who left
    finally:
        hub.close()


def test_many_idle_subscribers_cost_a_few_reads_per_second(client: redis.Redis) -> None:
    hub = EventHub(client)
    try:
        subs = [hub.subscribe(f"s{i}") for i in range(200)]
        time.sleep(0.3)
        before = int(client.info("stats")["total_commands_processed"])
        time.sleep(1.0)
        commands = int(client.info("stats")["total_commands_processed"]) - before - 1
        assert commands <= 2 * 1000 / READ_BLOCK_MS + 2, commands  # one XREAD per block, not one per call
        for s in subs:
            hub.unsubscribe(s)
    finally:
        hub.close()
