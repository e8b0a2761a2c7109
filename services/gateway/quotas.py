"""Who may hold how much of a gateway: concurrent streams per tenant and per client address, calls
per method group, WebRTC offers per address per minute. Plain Python (no gRPC): the gRPC API and
the WebRTC ingest both ask it. Every refusal is RESOURCE_EXHAUSTED with a retry hint.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

from services.errors import ResourceExhausted

Release = Callable[[], None]


def peer_host(peer: str) -> str:
    """A gRPC peer string (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``, ``unix:/p``) or an HTTP
    remote address without its port: the client address quotas count by."""
    kind, sep, rest = peer.partition(":")
    if not sep:
        return peer
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return rest if kind != "unix" else "unix"


class Counter:
    """Bounded counts per key (``limit`` <= 0 = unbounded)."""

    def __init__(self, limit: int, what: str, retry_after: float) -> None:
        self.limit, self.what, self.retry_after = limit, what, retry_after
        self._counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> Release:
        with self._lock:
            if self.limit > 0 and self._counts[key] >= self.limit:
                raise ResourceExhausted(
                    f"{self.what} reached its limit of {self.limit}; retry in {self.retry_after:.0f} s",
                    retry_after=self.retry_after,
                )
            self._counts[key] += 1
        done = threading.Event()

        def release() -> None:
            if done.is_set():
                return
            done.set()
            with self._lock:
                self._counts[key] -= 1
                if self._counts[key] <= 0:
                    del self._counts[key]

        return release

    def count(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)


class RateLimit:
    """At most ``per_minute`` events per key in any 60 s (sliding window; 0 = unbounded)."""

    def __init__(self, per_minute: int, what: str, max_keys: int = 10000) -> None:
        self.per_minute, self.what, self.max_keys = per_minute, what, max_keys
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._events.setdefault(key, deque())
            while q and now - q[0] >= 60.0:
                q.popleft()
            if len(q) >= self.per_minute:
                wait = max(1.0, 60.0 - (now - q[0]))
                raise ResourceExhausted(
                    f"{self.what}: at most {self.per_minute} a minute; retry in {wait:.0f} s",
                    retry_after=wait,
                )
            q.append(now)
            if len(self._events) > self.max_keys:  # forget idle keys (bounded memory)
                for k in [k for k, v in self._events.items() if not v or now - v[-1] >= 60.0]:
                    del self._events[k]


class StreamQuotas:
    """Concurrent live streams (gRPC calls and WebRTC peers) per tenant and per client address."""

    def __init__(self, per_tenant: int, per_address: int, retry_after: float) -> None:
        self.tenants = Counter(per_tenant, "this tenant's concurrent streams", retry_after)
        self.addresses = Counter(per_address, "this address's concurrent streams", retry_after)

    def acquire(self, tenant: str, address: str) -> Release:
        """A slot for one stream (anonymous callers count by address only)."""
        by_address = self.addresses.acquire(address)
        try:
            by_tenant = self.tenants.acquire(tenant) if tenant else (lambda: None)
        except BaseException:
            by_address()
            raise

        def release() -> None:
            by_tenant()
            by_address()

        return release
