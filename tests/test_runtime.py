"""Process helpers: settings from the environment and the periodic housekeeping loop."""

from __future__ import annotations

import threading

import pytest

from services.errors import ConfigError
from services.runtime import Periodic, redis_url_from


def test_redis_url_from_argument_environment_or_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="REDIS_URL"):
        redis_url_from(None)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert redis_url_from(None) == "redis://127.0.0.1:1/0"
    assert redis_url_from("redis://127.0.0.1:2/0") == "redis://127.0.0.1:2/0"


def test_periodic_survives_a_failing_call() -> None:
    calls: list[int] = []
    third = threading.Event()

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("one bad call")
        if len(calls) >= 3:
            third.set()

    p = Periodic("test-tick", 0.01, tick).start()
    try:
        assert third.wait(5.0), calls
    finally:
        p.stop()
    n = len(calls)
    assert not p._thread.is_alive()
    threading.Event().wait(0.05)
    assert len(calls) == n  # stopped means stopped
