"""A Redis client for each transport test: on the per-test flushed single server (tests/conftest.py's
redis_url) and on a real 3-primary Redis Cluster with replicas, so every script and multi-key read
of the transport is proven slot-safe (a cross-slot command fails on the Cluster)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from services.transport.connect import connect
from services.transport.redis_server import PrivateCluster, start_private_cluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateCluster]:
    cluster = start_private_cluster(primaries=3, replicas=1)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["single", "cluster"])
def client(request: pytest.FixtureRequest, redis_url: str) -> Iterator[redis.Redis]:
    if request.param == "single":
        c = redis.Redis.from_url(redis_url, socket_timeout=5)
    else:
        cluster: PrivateCluster = request.getfixturevalue("redis_cluster")
        c = connect(cluster.url + "?wait_replicas=1", socket_timeout=5)
        c.flushall()
    yield c
    if request.param == "cluster":
        c.flushall()
    c.close()
