"""Process settings read once from the environment, and the shutdown wait of every server."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from services.errors import ConfigError

log = logging.getLogger(__name__)


def redis_url_from(arg: str | None) -> str:
    """``--redis-url`` or ``$REDIS_URL``; fails loudly when neither is set."""
    url = arg or os.environ.get("REDIS_URL")
    if not url:
        raise ConfigError("No Redis: pass --redis-url or set REDIS_URL (midasheng up starts a private one).")
    return url


class Periodic:
    """Calls ``fn`` every ``interval_s`` seconds on a daemon thread until :meth:`stop`.

    An exception is logged and the loop goes on: housekeeping must not die with one bad call."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], object]) -> None:
        self.name, self.interval_s, self.fn = name, interval_s, fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception:
                log.exception("%s failed; retrying in %.0f s", self.name, self.interval_s)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def wait_for_shutdown(stop: Callable[[], None]) -> int:
    """Block until SIGINT/SIGTERM, then stop the server cleanly."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop()
    return 0
