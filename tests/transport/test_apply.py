"""apply_once: lease-fenced, idempotent on seq, atomic with the ack."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from services.errors import InvalidArgument
from services.transport import keys
from services.transport.apply import ApplyStatus, apply_once
from services.transport.keys import TransportDefaults
from services.transport.streams import StreamClient

SID = "s1"
TOKENS, CAPTIONS = keys.session_tokens(SID), keys.session_captions(SID)
LEASE, STATE = keys.session_lease(SID), keys.session_state(SID)
GROUP = "lm"
OTHER = "mdl:s:{s1}:other"  # another stream of the same session (same hash slot)


@pytest.fixture
def sc(client: redis.Redis) -> StreamClient:
    sc = StreamClient(client, TransportDefaults())
    sc.ensure_group(TOKENS, GROUP)
    client.set(LEASE, "w1", px=10_000)
    return sc


def deliver(sc: StreamClient, seq: int) -> str:
    """Add a token entry and read it, so it is pending for worker w1; return its id."""
    sc.add(TOKENS, {"seq": seq}, maxlen=100)
    [entry] = sc.read_group(GROUP, "w1", {TOKENS: ">"}, block_ms=None)
    return entry.id


def apply(
    client: redis.Redis, entry_id: str, seq: int, owner: str = "w1", maxlen: int = 100, **kw: Any
) -> tuple[ApplyStatus, list[str]]:
    return apply_once(
        client,
        lease_key=LEASE,
        owner=owner,
        state_key=STATE,
        seq=seq,
        ack_stream=TOKENS,
        group=GROUP,
        entry_id=entry_id,
        outputs=[(CAPTIONS, {"text": f"caption {seq}", "seq": seq}, maxlen)],
        ttl_s=60,
        **kw,
    )


def pending(client: redis.Redis) -> int:
    return int(client.xpending(TOKENS, GROUP)["pending"])


def test_applied_once_then_duplicates_are_acked_without_output(sc: StreamClient, client: redis.Redis) -> None:
    status, ids = apply(client, deliver(sc, 7), 7, state_updates={"segment": 3, "text": "a dog barks"})
    assert status == ApplyStatus.APPLIED == "applied"
    [(cap_id, fields)] = client.xrange(CAPTIONS)
    assert ids == [cap_id.decode()] and fields == {b"text": b"caption 7", b"seq": b"7"}
    assert client.hgetall(STATE) == {b"last_seq": b"7", b"segment": b"3", b"text": b"a dog barks"}
    assert 0 < client.ttl(STATE) <= 60
    assert pending(client) == 0
    for seq in (7, 6):  # redelivery of the same seq, and an older one
        assert apply(client, deliver(sc, seq), seq) == (ApplyStatus.DUPLICATE, [])
        assert client.xlen(CAPTIONS) == 1
        assert pending(client) == 0
    assert client.hget(STATE, "last_seq") == b"7"


def test_lease_lost_writes_nothing_and_leaves_the_entry_pending(
    sc: StreamClient, client: redis.Redis
) -> None:
    client.set(LEASE, "w2", px=10_000)  # another worker took the session over
    entry_id = deliver(sc, 1)
    assert apply(client, entry_id, 1, owner="w1") == (ApplyStatus.LEASE_LOST, [])
    assert client.xlen(CAPTIONS) == 0 and not client.exists(STATE)
    assert pending(client) == 1
    assert apply(client, entry_id, 1, owner="w2")[0] == ApplyStatus.APPLIED
    assert pending(client) == 0


def test_outputs_are_capped_and_drops_counted(sc: StreamClient, client: redis.Redis) -> None:
    for seq in range(1, 6):
        assert apply(client, deliver(sc, seq), seq, maxlen=3)[0] == ApplyStatus.APPLIED
    assert client.xlen(CAPTIONS) == 3
    assert sc.counters() == {f"dropped:{CAPTIONS}": 2}


def test_several_outputs_and_bad_arguments(sc: StreamClient, client: redis.Redis) -> None:
    status, ids = apply_once(
        client,
        lease_key=LEASE,
        owner="w1",
        state_key=STATE,
        seq=1,
        ack_stream=TOKENS,
        group=GROUP,
        entry_id=deliver(sc, 1),
        outputs=[(CAPTIONS, {"a": 1}, 10), (OTHER, {"b": b"2"}, 10)],
        ttl_s=60,
    )
    assert status == ApplyStatus.APPLIED and len(ids) == 2
    assert client.xrange(OTHER)[0][0].decode() == ids[1]
    # A key of another slot (another session, a global stream) is refused before anything runs.
    with pytest.raises(InvalidArgument, match="several hash slots"):
        apply_once(
            client,
            lease_key=LEASE,
            owner="w1",
            state_key=STATE,
            seq=2,
            ack_stream=TOKENS,
            group=GROUP,
            entry_id=deliver(sc, 2),
            outputs=[(keys.session_captions("s2"), {"a": 1}, 10)],
            ttl_s=60,
        )
    assert client.hget(STATE, "last_seq") == b"1"
    with pytest.raises(InvalidArgument, match="last_seq"):
        apply(client, "0-1", 2, state_updates={"last_seq": 9})
    with pytest.raises(InvalidArgument, match="seq"):
        apply(client, "0-1", -1)
