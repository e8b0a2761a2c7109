"""Streams transport against a real redis-server: caps, at-least-once, claims, dead letters."""

from __future__ import annotations

import time

import pytest
import redis

from services.errors import InvalidArgument
from services.transport import keys
from services.transport.keys import DEAD_LETTERS, TransportDefaults
from services.transport.streams import Consumer, Entry, StreamClient, parse_autoclaim, parse_read

IDLE_MS = 250
DEFAULTS = TransportDefaults(claim_min_idle_ms=IDLE_MS, block_ms=20, max_deliveries=3)
STREAM = keys.session_tokens("s1")
GROUP = "lm"


@pytest.fixture
def sc(client: redis.Redis) -> StreamClient:
    return StreamClient(client, DEFAULTS)


def pending_ids(client: redis.Redis) -> list[str]:
    return [p["message_id"].decode() for p in client.xpending_range(STREAM, GROUP, "-", "+", 100)]


def wait_idle() -> None:
    time.sleep(IDLE_MS / 1000 + 0.03)


def test_keys_and_defaults_validation() -> None:
    # Cluster hash tags: every key of a session (and its counters) is in the session's slot.
    assert keys.session_tokens("abc") == "mdl:s:{abc}:tokens"
    assert keys.session_captions("abc") == "mdl:s:{abc}:captions"
    assert keys.session_state("abc") == "mdl:s:{abc}:state"
    assert keys.session_lease("abc") == "mdl:s:{abc}:lease"
    assert keys.session_config("abc") == "mdl:s:{abc}:config"
    assert keys.counters_key(keys.session_tokens("abc")) == "mdl:counters:{abc}"
    assert keys.same_slot(*keys.session_keys("abc")) and len(keys.session_keys("abc")) == 6
    assert not keys.same_slot(keys.session_state("abc"), keys.session_state("abd"))
    assert keys.session_of(keys.session_lease("a-1")) == "a-1" and keys.session_of(DEAD_LETTERS) is None
    assert keys.job_key("j1") == "mdl:job:{j1}" and keys.same_slot(
        keys.job_key("j1"), keys.job_events_key("j1"), keys.job_lease_key("j1")
    )
    assert keys.hash_tag("a{}b") == "a{}b" and keys.hash_tag("x{y}z{w}") == "y"
    for bad in ("", "a b", "a{b", "a}b"):
        with pytest.raises(ValueError, match="session id"):
            keys.session_tokens(bad)
    with pytest.raises(ValueError, match="job id"):
        keys.job_key("{j}")
    with pytest.raises(ValueError, match="heartbeat_ms"):
        TransportDefaults(heartbeat_ms=3000, lease_ttl_ms=3000)
    with pytest.raises(ValueError, match="block_ms must be a positive integer"):
        TransportDefaults(block_ms=0)
    with pytest.raises(ValueError, match="max_deliveries"):
        TransportDefaults(max_deliveries=True)


def test_add_caps_stream_and_counts_drops(sc: StreamClient, client: redis.Redis) -> None:
    ids = [sc.add(STREAM, {"seq": i, "data": b"\x00\xff"}, maxlen=10) for i in range(15)]
    assert client.xlen(STREAM) == 10
    assert [e[0].decode() for e in client.xrange(STREAM)] == ids[5:]
    assert sc.counters() == {f"dropped:{STREAM}": 5}
    sc.add("other", {"x": 1}, maxlen=1)
    sc.add("other", {"x": 2}, maxlen=1, counter="named")
    assert sc.counters()["dropped:named"] == 1
    with pytest.raises(InvalidArgument):
        sc.add(STREAM, {}, maxlen=10)
    with pytest.raises(InvalidArgument):
        sc.add(STREAM, {"x": 1}, maxlen=0)


def test_read_group_times_out_and_refuses_infinite_block(sc: StreamClient) -> None:
    sc.ensure_group(STREAM, GROUP)
    sc.ensure_group(STREAM, GROUP)  # BUSYGROUP is ignored
    t0 = time.monotonic()
    assert sc.read_group(GROUP, "a", {STREAM: ">"}, block_ms=20) == []
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(InvalidArgument):
        sc.read_group(GROUP, "a", {STREAM: ">"}, block_ms=0)


def test_dead_consumer_entries_are_claimed_only_after_idle(sc: StreamClient, client: redis.Redis) -> None:
    a = Consumer(sc, STREAM, GROUP, "a", DEFAULTS)
    b = Consumer(sc, STREAM, GROUP, "b", DEFAULTS)
    ids = [sc.add(STREAM, {"seq": i}, maxlen=100) for i in range(3)]
    got = a.poll()
    assert [e.id for e in got] == ids
    assert got[0] == Entry(STREAM, ids[0], {"seq": b"0"})
    # a dies without acking: b sees nothing until the entries have been idle claim_min_idle_ms.
    assert b.poll() == []
    wait_idle()
    claimed = b.poll()
    assert [e.id for e in claimed] == ids
    assert sc.delivery_counts(STREAM, GROUP, ids) == {i: 2 for i in ids}
    for entry in claimed:
        assert b.ack(entry) == 1
    assert pending_ids(client) == []


def test_restarted_consumer_reads_its_own_pending_first(sc: StreamClient, client: redis.Redis) -> None:
    a = Consumer(sc, STREAM, GROUP, "a", DEFAULTS)
    old = [sc.add(STREAM, {"seq": i}, maxlen=100) for i in range(2)]
    assert [e.id for e in a.poll()] == old
    new = sc.add(STREAM, {"seq": 2}, maxlen=100)
    restarted = Consumer(sc, STREAM, GROUP, "a", DEFAULTS)
    assert [e.id for e in restarted.poll()] == old
    assert [e.id for e in restarted.poll()] == [new]
    assert sorted(pending_ids(client)) == sorted([*old, new])


def test_pending_entries_trimmed_away_are_acked_on_restart(sc: StreamClient, client: redis.Redis) -> None:
    a = Consumer(sc, STREAM, GROUP, "a", DEFAULTS)
    first = sc.add(STREAM, {"seq": 0}, maxlen=2)
    assert [e.id for e in a.poll()] == [first]
    sc.add(STREAM, {"seq": 1}, maxlen=1)  # trims the pending entry
    restarted = Consumer(sc, STREAM, GROUP, "a", DEFAULTS)
    assert restarted.poll() == []
    assert first not in pending_ids(client)
    assert sc.counters()[f"dropped:{STREAM}"] == 1


def test_redelivered_too_often_goes_to_dead_letters(sc: StreamClient, client: redis.Redis) -> None:
    a = Consumer(sc, STREAM, GROUP, "a", DEFAULTS)
    b = Consumer(sc, STREAM, GROUP, "b", DEFAULTS)
    entry_id = sc.add(STREAM, {"payload": b"crashes the worker"}, maxlen=100)
    assert [e.id for e in a.poll()] == [entry_id]  # delivery 1
    assert b.poll() == []
    for delivery in (2, 3):
        wait_idle()
        assert [e.id for e in b.poll()] == [entry_id], delivery
    wait_idle()
    assert b.poll() == []  # delivery 4 > max_deliveries: dead-lettered, not returned
    assert pending_ids(client) == []
    [(dl_id, record)] = client.xrange(DEAD_LETTERS)
    assert record == {
        b"stream": STREAM.encode(),
        b"id": entry_id.encode(),
        b"group": GROUP.encode(),
        b"reason": b"exceeded 3 deliveries",
        b"deliveries": b"4",
        b"f:payload": b"crashes the worker",
    }
    assert sc.counters()["deadletters"] == 1


def test_dead_letters_are_capped_by_age_too(client: redis.Redis) -> None:
    """A dead letter older than deadletter_ttl_s is trimmed when the next one is written; newer
    ones and every count stay."""
    sc = StreamClient(client, TransportDefaults(deadletter_ttl_s=60))
    old_ms = int((time.time() - 120) * 1000)  # two minutes old: past the 60 s
    client.xadd(DEAD_LETTERS, {"stream": "old"}, id=f"{old_ms}-0")
    recent_ms = int((time.time() - 30) * 1000)
    client.xadd(DEAD_LETTERS, {"stream": "recent"}, id=f"{recent_ms}-0")
    sc.ensure_group(STREAM, GROUP)
    entry_id = sc.add(STREAM, {"payload": b"x"}, maxlen=10)
    sc.dead_letter(STREAM, GROUP, Entry(STREAM, entry_id, {"payload": b"x"}), "poison", 1)
    kept = [f[b"stream"] for _, f in client.xrange(DEAD_LETTERS)]
    assert kept == [b"recent", STREAM.encode()]
    assert sc.counters()["deadletters"] == 1


def test_fail_poison_dead_letters_at_once_and_plain_fail_retries(
    sc: StreamClient, client: redis.Redis
) -> None:
    c = Consumer(sc, STREAM, GROUP, "c", DEFAULTS)
    bad = sc.add(STREAM, {"json": b"{not json"}, maxlen=100)
    flaky = sc.add(STREAM, {"json": b"{}"}, maxlen=100)
    bad_entry, flaky_entry = c.poll()
    dl_id = c.fail(bad_entry, "unparseable payload", poison=True)
    assert c.fail(flaky_entry, "worker busy") is None
    assert pending_ids(client) == [flaky]
    record = dict(client.xrange(DEAD_LETTERS))[dl_id.encode()]
    assert record[b"reason"] == b"unparseable payload"
    assert record[b"id"] == bad.encode() and record[b"deliveries"] == b"1"
    assert sc.counters(DEAD_LETTERS) == {"deadletters": 1}
    wait_idle()
    assert [e.id for e in c.poll()] == [flaky]  # retried after claim_min_idle_ms


def test_parse_autoclaim_redis62_two_element_reply() -> None:
    reply = [b"5-0", [[b"1-0", [b"k", b"v"]], None, [b"3-0", None]]]
    assert parse_autoclaim("s", reply) == ("5-0", [Entry("s", "1-0", {"k": b"v"})], ["3-0"])
    assert parse_autoclaim("s", ["0-0", []]) == ("0-0", [], [])


def test_parse_autoclaim_redis7_three_element_reply() -> None:
    reply = [b"0-0", [[b"1-0", [b"k", b"v", b"n", b"1"]]], [b"2-0", b"4-0"]]
    assert parse_autoclaim("s", reply) == ("0-0", [Entry("s", "1-0", {"k": b"v", "n": b"1"})], ["2-0", "4-0"])
    # decode_responses=True clients hand back text; values stay bytes in an Entry.
    assert parse_autoclaim("s", ["0-0", [["1-0", ["k", "v"]]], []]) == (
        "0-0",
        [Entry("s", "1-0", {"k": b"v"})],
        [],
    )
    with pytest.raises(ValueError, match="expected 2"):
        parse_autoclaim("s", [b"0-0"])


def test_parse_read_resp2_list_and_resp3_map() -> None:
    items = [[b"1-0", [b"k", b"v"]], [b"2-0", None]]
    expected = [Entry("s", "1-0", {"k": b"v"}), Entry("s", "2-0", {})]
    assert parse_read([[b"s", items]]) == parse_read({b"s": items}) == expected
    assert expected[1].trimmed and not expected[0].trimmed
    assert parse_read(None) == []


def test_autoclaim_reports_deleted_entries_on_redis7(sc: StreamClient, client: redis.Redis) -> None:
    sc.ensure_group(STREAM, GROUP)
    kept, gone = (sc.add(STREAM, {"seq": i}, maxlen=100) for i in range(2))
    sc.read_group(GROUP, "a", {STREAM: ">"}, block_ms=None)
    client.xdel(STREAM, gone)
    next_id, entries, deleted = sc.autoclaim(STREAM, GROUP, "b", min_idle_ms=0)
    assert (next_id, [e.id for e in entries], deleted) == ("0-0", [kept], [gone])


def test_works_with_decoding_client(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5) as text_client:
        tsc = StreamClient(text_client, DEFAULTS)
        entry_id = tsc.add(STREAM, {"pcm": b"\x00\xff"}, maxlen=5)
        [entry] = Consumer(tsc, STREAM, GROUP, "a", DEFAULTS).poll()
        assert entry == Entry(STREAM, entry_id, {"pcm": b"\x00\xff"})
