"""History on a real Redis: search, cursors, idempotent adds, retention, cap, isolation, exports."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio

from services.audio.subtitles import TimedCaption, parse_webvtt
from services.errors import InvalidArgument
from services.monitor.history import HistoryEntry, HistoryStore, to_json, to_webvtt
from services.monitor.limits import DAY_SECONDS, MonitorLimits
from services.transport import keys

Run = Callable[[Any], Any]
NOW = time.time()


def caption(n: int, text: str, wall: float, stream: str = "cam-1", tenant: str = "acme") -> HistoryEntry:
    return HistoryEntry(
        "caption", tenant, stream, f"{n}-0", text, wall, 10.0 * n, 10.0 * n + 10, segment_id=n
    )


ENTRIES = [
    caption(1, "A dog barks.", NOW - 50),
    caption(2, "Rain falls on a roof.", NOW - 40),
    caption(3, "A DOG barks and a baby cries.", NOW - 30, stream="cam-2"),
    HistoryEntry(
        "answer", "acme", "cam-1", "4-0", "Yes, a baby is crying.", NOW - 20, 30, 40, "q-baby", True, 3
    ),
    HistoryEntry(
        "alert", "acme", "cam-1", "0000000000001-ab", "A dog barks.", NOW - 10, 0, 10, rule_id="dog"
    ),
]


async def everything(store: HistoryStore, tenant: str, **query: Any) -> list[HistoryEntry]:
    """Every page of a search, following the cursor."""
    out: list[HistoryEntry] = []
    before = None
    for _ in range(1000):
        page = await store.search(tenant, before=before, **query)
        out += page.entries
        if not page.before:
            return out
        before = page.before
    raise AssertionError("the cursor never ended")


def test_search_by_text_stream_kind_and_time(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        store = HistoryStore(client)
        assert await store.add(ENTRIES) == 5
        got = await store.search("acme", text="dog BARKS")
        assert [e.event_id for e in got.entries] == ["0000000000001-ab", "3-0", "1-0"] and got.before == ""
        # Everything comes back; the wall time to the millisecond (the score).
        assert replace(got.entries[1], wall_time=0) == replace(ENTRIES[2], wall_time=0)
        assert got.entries[1].wall_time == pytest.approx(NOW - 30, abs=0.001)
        assert [e.event_id for e in (await store.search("acme", text="baby")).entries] == ["4-0", "3-0"]
        assert [e.event_id for e in (await store.search("acme", text="dog rain")).entries] == []
        assert [e.stream for e in (await store.search("acme", text="dog", stream="cam-2")).entries] == [
            "cam-2"
        ]
        assert [e.kind for e in (await store.search("acme", kinds=("answer", "alert"))).entries] == [
            "alert",
            "answer",
        ]
        window = await store.search("acme", since=NOW - 45, until=NOW - 20)
        assert [e.event_id for e in window.entries] == ["4-0", "3-0", "2-0"]
        answer = (await store.search("acme", kinds=("answer",))).entries[0]
        assert (answer.answer, answer.question_id, answer.segment_id) == (True, "q-baby", 3)
        with pytest.raises(InvalidArgument, match="kinds"):
            await store.search("acme", kinds=("note",))
        with pytest.raises(InvalidArgument, match="limit"):
            await store.search("acme", limit=0)
        with pytest.raises(InvalidArgument, match="cursor"):
            await store.search("acme", before="yesterday")

    run_redis(scenario)


def test_cursors_walk_every_entry_once(run_redis: Run) -> None:
    # 30 entries, three per millisecond: a cursor must split a millisecond cleanly.
    entries = [
        caption(n, f"caption {n} {'odd' if n % 2 else 'even'}", NOW - 100 + n // 3 / 1000) for n in range(30)
    ]

    async def scenario(client: redis.asyncio.Redis) -> None:
        store = HistoryStore(client, MonitorLimits(history_scan_max=7))
        await store.add(entries)
        newest_first = [e.event_id for e in sorted(entries, key=lambda e: e.wall_time, reverse=True)]
        for limit in (1, 4, 30):
            got = await everything(store, "acme", limit=limit)
            assert sorted(e.event_id for e in got) == sorted(newest_first) and len(got) == 30
            assert [e.wall_time for e in got] == sorted((e.wall_time for e in got), reverse=True)
        odd = await everything(store, "acme", text="odd", limit=2)
        assert sorted(e.event_id for e in odd) == sorted(f"{n}-0" for n in range(1, 30, 2))
        # A page cut short by the scan bound still says where to go on.
        first = await store.search("acme", text="even", limit=100)
        assert len(first.entries) < 15 and first.before

    run_redis(scenario)


def test_adding_again_is_idempotent_and_tenants_are_isolated(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        store = HistoryStore(client)
        assert await store.add(ENTRIES) == 5
        replay = [caption(1, "A dog barks.", NOW + 5), ENTRIES[3]]  # a resumed stream, seen later
        assert await store.add(replay) == 0 and await store.count("acme") == 5
        assert (await store.search("acme", text="dog", stream="cam-1", kinds=("caption",))).entries[
            0
        ].wall_time == pytest.approx(NOW - 50, abs=0.001)
        assert await store.count("globex") == 0
        assert (await store.search("globex", text="dog")).entries == []
        assert (await store.search("", text="dog")).entries == []
        assert await store.add([caption(1, "A dog barks.", NOW, tenant="globex")]) == 1
        assert [e.tenant for e in (await store.search("globex")).entries] == ["globex"]
        assert await store.count("acme") == 5

    run_redis(scenario)


def test_retention_deletes_exactly_the_expired_entries(run_redis: Run) -> None:
    old = [caption(n, "old", NOW - 6 * DAY_SECONDS + n) for n in (1, 2)]
    mid = [caption(n, "mid", NOW - 3 * DAY_SECONDS + n) for n in (3, 4, 5)]
    new = [caption(6, "new", NOW)]

    async def scenario(client: redis.asyncio.Redis) -> None:
        store = HistoryStore(client)  # 7 days
        await store.add(old + mid + new)
        await store.add(
            [caption(9, "old", NOW, tenant="globex"), caption(8, "x", NOW - 6 * DAY_SECONDS, "s", "globex")]
        )
        assert await store.count("acme") == 6
        assert await store.expire("acme", now=NOW + 2 * DAY_SECONDS) == 2
        assert await store.count("acme") == 4
        assert sorted(e.event_id for e in (await store.search("acme")).entries) == [
            "3-0",
            "4-0",
            "5-0",
            "6-0",
        ]
        assert await store.expire("acme", now=NOW + 2 * DAY_SECONDS) == 0
        assert await store.count("globex") == 2  # another tenant's expiry is its own
        assert 0 < await client.ttl(keys.monitor_history("acme")) <= 7 * DAY_SECONDS
        # An entry already past retention when added is trimmed by the add itself.
        await store.add([caption(7, "ancient", NOW - 8 * DAY_SECONDS)])
        assert await store.count("acme") == 4

    run_redis(scenario)


def test_the_cap_keeps_the_newest(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        store = HistoryStore(client, MonitorLimits(history_max_entries=5))
        await store.add([caption(n, "x", NOW - 100 + n) for n in range(4)])
        await store.add([caption(n, "x", NOW - 100 + n) for n in range(4, 8)])
        assert await store.count("acme") == 5
        assert [e.event_id for e in (await store.search("acme")).entries] == [
            f"{n}-0" for n in range(7, 2, -1)
        ]

    run_redis(scenario)


def test_exports() -> None:
    cues = parse_webvtt(to_webvtt([ENTRIES[4], ENTRIES[0], ENTRIES[3], ENTRIES[1]]))
    assert cues == [
        TimedCaption(0.0, 10.0, "ALERT dog: A dog barks."),
        TimedCaption(10.0, 20.0, "A dog barks."),
        TimedCaption(20.0, 30.0, "Rain falls on a roof."),
        TimedCaption(30.0, 40.0, "q-baby: Yes, a baby is crying."),
    ]
    with pytest.raises(InvalidArgument, match="one stream"):
        to_webvtt(ENTRIES)
    docs = json.loads(to_json(ENTRIES[3:]))
    assert [d["kind"] for d in docs] == ["answer", "alert"]
    assert docs[0] == {
        "kind": "answer",
        "tenant": "acme",
        "stream": "cam-1",
        "event_id": "4-0",
        "question_id": "q-baby",
        "text": "Yes, a baby is crying.",
        "answer": True,
        "window_start": 30,
        "window_end": 40,
        "wall_time": NOW - 20,
        "segment_id": 3,
        "rule_id": "",
    }
    with pytest.raises(InvalidArgument, match="kind"):
        HistoryEntry("note", "acme", "cam-1", "1-0", "x", NOW)
