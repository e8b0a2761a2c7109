"""Fixtures shared by all tests: a real private redis-server per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from lm_service.engines.base import CaptionEngine
from lm_service.server import build_engine
from services.model.checkpoint import load_model
from services.model.modeling import MiDashengLM
from services.transport.redis_server import PrivateRedis, start_private_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    server = start_private_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> Iterator[str]:
    """A clean database for each test (flushed before and after)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture(scope="session")
def engine() -> Iterator[CaptionEngine]:
    """The default (batched) caption engine over the demo model, on the CPU."""
    e = build_engine(None, "cpu")
    yield e
    e.close()


@pytest.fixture(scope="session")
def encoder_model() -> MiDashengLM:
    return load_model(None)
