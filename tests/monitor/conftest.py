"""Async Redis for the monitoring tests: each scenario runs in its own event loop with its own client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

Scenario = Callable[[redis.asyncio.Redis], Awaitable[Any]]


@pytest.fixture
def run_redis(redis_url: str) -> Callable[[Scenario], Any]:
    """``run_redis(scenario)``: await ``scenario(client)`` (at most 20 s) and close the client."""

    def run(scenario: Scenario) -> Any:
        async def main() -> Any:
            client = redis.asyncio.Redis.from_url(redis_url)
            try:
                return await asyncio.wait_for(scenario(client), 20)
            finally:
                await client.aclose()

        return asyncio.run(main())

    return run
