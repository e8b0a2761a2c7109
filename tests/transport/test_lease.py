"""Owner-token leases and the heartbeat thread, against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from services.errors import InvalidArgument
from services.transport import keys
from services.transport.lease import Heartbeat, Lease

KEY = keys.session_lease("s1")


@pytest.fixture
def lease(client: redis.Redis) -> Lease:
    return Lease(client)


def test_acquire_excludes_others_and_only_the_owner_renews_or_releases(lease: Lease) -> None:
    assert lease.owner(KEY) is None
    assert lease.acquire(KEY, "w1", 5000)
    assert not lease.acquire(KEY, "w2", 5000)
    assert not lease.acquire(KEY, "w1", 5000)  # not re-entrant
    assert lease.owner(KEY) == "w1"
    assert not lease.renew(KEY, "w2", 5000)
    assert lease.renew(KEY, "w1", 5000)
    assert not lease.release(KEY, "w2")
    assert lease.owner(KEY) == "w1"
    assert lease.release(KEY, "w1")
    assert lease.owner(KEY) is None
    assert not lease.renew(KEY, "w1", 5000)  # a released lease cannot be revived by renew
    with pytest.raises(InvalidArgument):
        lease.acquire(KEY, "w1", 0)


def test_expiry_lets_another_owner_acquire(lease: Lease) -> None:
    assert lease.acquire(KEY, "w1", 50)
    time.sleep(0.08)
    assert lease.owner(KEY) is None
    assert lease.acquire(KEY, "w2", 5000)
    assert not lease.renew(KEY, "w1", 5000)
    assert lease.owner(KEY) == "w2"


def test_heartbeat_keeps_lease_alive_and_reports_takeover(lease: Lease, client: redis.Redis) -> None:
    lost: list[str] = []
    lost_event = threading.Event()

    def on_lost(key: str) -> None:
        lost.append(key)
        lost_event.set()

    assert lease.acquire(KEY, "w1", 300)
    with Heartbeat(lease, "w1", ttl_ms=300, heartbeat_ms=50, on_lost=on_lost) as hb:
        hb.add(KEY)
        time.sleep(0.7)  # well past the TTL
        assert lease.owner(KEY) == "w1"
        assert hb.held() == {KEY}
        client.set(KEY, "w2", px=5000)  # taken over
        assert lost_event.wait(2.0)
        assert lost == [KEY]
        assert hb.held() == set()
        assert lease.owner(KEY) == "w2"
    assert not hb._thread.is_alive()


def test_heartbeat_does_not_report_a_discarded_lease(lease: Lease) -> None:
    lost: list[str] = []
    hb = Heartbeat(lease, "w1", ttl_ms=1000, heartbeat_ms=100, on_lost=lost.append)
    assert lease.acquire(KEY, "w1", 1000)
    hb.add(KEY)
    hb.beat()
    hb.discard(KEY)
    assert lease.release(KEY, "w1")
    hb.beat()
    assert lost == [] and hb.held() == set()


class _Unreachable(Lease):
    def __init__(self) -> None:  # no client: every renewal fails to connect
        pass

    def renew(self, key: str, owner: str, ttl_ms: int) -> bool:
        raise redis.ConnectionError("connection refused")


def test_heartbeat_assumes_loss_only_after_a_whole_ttl_unreachable() -> None:
    lost: list[str] = []
    hb = Heartbeat(_Unreachable(), "w1", ttl_ms=100, heartbeat_ms=20, on_lost=lost.append)
    hb.add(KEY)
    hb.beat()
    assert lost == [] and hb.held() == {KEY}
    time.sleep(0.12)
    hb.beat()
    assert lost == [KEY] and hb.held() == set()


def test_heartbeat_rejects_interval_not_shorter_than_ttl(lease: Lease) -> None:
    with pytest.raises(InvalidArgument, match="heartbeat_ms"):
        Heartbeat(lease, "w1", ttl_ms=100, heartbeat_ms=100)
