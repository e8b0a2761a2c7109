"""The connection factory: URLs of every form, Sentinel against real Sentinels, WAIT for replicas,
and reads over the streams of many sessions (one command per slot on a Cluster)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from services import metrics
from services.errors import ConfigError
from services.transport import keys
from services.transport.connect import WaitPolicy, connect, parse_url, redact, slot_groups, wait_policy
from services.transport.redis_server import PrivateSentinel, start_private_sentinel
from services.transport.streams import StreamClient


def test_single_server_urls_pass_through_with_wait_options_taken_out() -> None:
    t = parse_url("redis://:pw@h:6380/2?wait_replicas=1&wait_timeout_ms=250&health_check_interval=5")
    assert t.kind == "single" and t.wait == WaitPolicy(1, 250)
    assert t.url == "redis://:pw@h:6380/2?health_check_interval=5"
    assert parse_url("unix:///run/redis.sock").url == "unix:///run/redis.sock"
    assert parse_url("rediss://h").wait is None


def test_sentinel_and_cluster_urls() -> None:
    s = parse_url(
        "redis+sentinel://u:p%40ss@s1:26379,[::1]:26380/mymaster/3?sentinel_password=x&wait_replicas=2"
    )
    assert (s.kind, s.nodes, s.service, s.db) == ("sentinel", (("s1", 26379), ("::1", 26380)), "mymaster", 3)
    assert (s.username, s.password, s.tls, s.option("sentinel_password")) == ("u", "p@ss", False, "x")
    assert s.wait == WaitPolicy(2, 1000)
    c = parse_url("rediss+cluster://:secret@n1:7000,n2:7001?ssl_ca_certs=/tls/ca.crt")
    assert (c.kind, c.nodes, c.password, c.tls, c.option("ssl_ca_certs")) == (
        "cluster",
        (("n1", 7000), ("n2", 7001)),
        "secret",
        True,
        "/tls/ca.crt",
    )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("localhost:6379", "Not a Redis URL"),
        ("memcached://h:1", "Unknown Redis URL scheme"),
        ("redis+sentinel://s1:26379", "SERVICE"),
        ("redis+sentinel://s1/mymaster", "is not HOST:PORT"),
        ("redis+cluster://n1:7000/0", "no database number"),
        ("redis+cluster://n1:7000?retries=3", "unknown option(s) retries"),
        ("redis://h?wait_replicas=-1", "wait_replicas"),
        ("redis://h?wait_replicas=1&wait_timeout_ms=0", "wait_timeout_ms"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_url(url)


def test_passwords_never_reach_logs() -> None:
    assert redact("redis://:hunter2@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis+sentinel://u:hunter2@a:1,b:2/m?sentinel_password=hunter3&x=1") == (
        "redis+sentinel://u:***@a:1,b:2/m?sentinel_password=***&x=1"
    )
    with pytest.raises(ConfigError) as e:
        parse_url("redis+sentinel://u:hunter2@a:1,b/m")
    assert "hunter2" not in str(e.value)


@pytest.fixture(scope="module")
def sentinel() -> Iterator[PrivateSentinel]:
    group = start_private_sentinel(replicas=1, sentinels=3)
    yield group
    group.stop()


def test_sentinel_url_reaches_the_primary_and_waits_for_its_replica(sentinel: PrivateSentinel) -> None:
    client = connect(sentinel.url + "?wait_replicas=1&wait_timeout_ms=2000")
    try:
        assert wait_policy(client) == WaitPolicy(1, 2000)
        before = metrics.REDIS_UNREPLICATED._value.get()
        sc = StreamClient(client)
        stream = keys.session_tokens("sentinel-1")
        entry_id = sc.add(stream, {"x": 1}, maxlen=10)
        assert client.info("replication")["role"] == "master"
        [replica] = sentinel.servers[1:]
        with replica.client() as r:  # WAIT returned 1: the replica has it already
            assert [i.decode() for i, _ in r.xrange(stream)] == [entry_id]
        assert metrics.REDIS_UNREPLICATED._value.get() == before
    finally:
        client.close()


def test_a_write_no_replica_confirms_is_kept_and_counted(redis_url: str) -> None:
    client = connect(redis_url + "?wait_replicas=1&wait_timeout_ms=50")  # a server without replicas
    try:
        before = metrics.REDIS_UNREPLICATED._value.get()
        t0 = time.monotonic()
        StreamClient(client).add(keys.session_tokens("lonely"), {"x": 1}, maxlen=10)
        assert 0.04 < time.monotonic() - t0 < 2.0  # WAIT ran to its timeout
        assert client.xlen(keys.session_tokens("lonely")) == 1
        assert metrics.REDIS_UNREPLICATED._value.get() == before + 1
    finally:
        client.close()


def test_reads_over_many_sessions_block_and_wake(client: redis.Redis) -> None:
    sc = StreamClient(client)
    streams = {keys.session_tokens(f"many-{i}"): ">" for i in range(12)}
    groups = slot_groups(client, list(streams))
    assert len(groups) == (12 if isinstance(client, RedisCluster) else 1)
    for stream in streams:
        sc.ensure_group(stream, "lm", start="$")
    t0 = time.monotonic()
    assert sc.read_group("lm", "w", streams, block_ms=150) == []
    assert 0.14 < time.monotonic() - t0 < 1.0  # waited its block, no longer
    last = list(streams)[-1]
    threading.Timer(0.1, lambda: sc.add(last, {"x": 1}, maxlen=10)).start()
    t0 = time.monotonic()
    got = sc.read_group("lm", "w", streams, block_ms=2000)
    assert [e.stream for e in got] == [last] and time.monotonic() - t0 < 1.0  # woken early
    for i, stream in enumerate(streams):
        sc.add(stream, {"i": i}, maxlen=10)
    got = sc.read_group("lm", "w", streams, block_ms=100)
    assert sorted(int(e.fields["i"]) for e in got) == list(range(12))
    plain = sc.read({s: "0-0" for s in streams}, count=10, block_ms=None)
    assert len(plain) == 13
