"""Process settings read once from the environment, and the shutdown wait of every server."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from services.errors import ConfigError


def redis_url_from(arg: str | None) -> str:
    """``--redis-url`` or ``$REDIS_URL``; fails loudly when neither is set."""
    url = arg or os.environ.get("REDIS_URL")
    if not url:
        raise ConfigError("No Redis: pass --redis-url or set REDIS_URL (midasheng up starts a private one).")
    return url


def wait_for_shutdown(stop: Callable[[], None]) -> int:
    """Block until SIGINT/SIGTERM, then stop the server cleanly."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop()
    return 0
