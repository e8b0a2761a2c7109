"""Owner-token leases on single Redis keys, and a heartbeat thread that keeps them alive.

A lease is a string key holding its owner's token with a PX expiry. Only the owner can renew
or release it (compare-and-set in Lua), so a worker that stalled past its TTL cannot extend
or delete a lease another worker has taken over; writes guarded by the lease check it in the
same script (see ``apply.apply_once``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from services.errors import InvalidArgument

log = logging.getLogger(__name__)

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _check_ttl(ttl_ms: int) -> None:
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise InvalidArgument(f"A lease TTL must be a positive number of milliseconds, got {ttl_ms!r}.")


class Lease:
    """Acquire, renew, release and inspect owner-token leases."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def acquire(self, key: str, owner: str, ttl_ms: int) -> bool:
        """Take the lease if nobody holds it (SET NX PX); False if it is held, even by ``owner``."""
        _check_ttl(ttl_ms)
        return bool(self.client.set(key, owner, nx=True, px=ttl_ms))

    def renew(self, key: str, owner: str, ttl_ms: int) -> bool:
        """Reset the TTL to ``ttl_ms`` if ``owner`` still holds the lease; False if it was lost."""
        _check_ttl(ttl_ms)
        return bool(self._renew(keys=[key], args=[owner, ttl_ms]))

    def release(self, key: str, owner: str) -> bool:
        """Delete the lease if ``owner`` holds it; False (and nothing deleted) otherwise."""
        return bool(self._release(keys=[key], args=[owner]))

    def owner(self, key: str) -> str | None:
        """The current owner token, or None when the lease is free."""
        value = self.client.get(key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)


class Heartbeat:
    """A daemon thread renewing a set of leases held by one owner every ``heartbeat_ms``.

    ``on_lost(key)`` is called from the thread, once, when a renewal finds the lease taken over
    or expired, or when Redis could not be reached for a whole TTL (the lease must be assumed
    gone); the key is then no longer held. Call ``discard(key)`` *before* releasing a lease, so
    the release is not reported as a loss. All methods are thread-safe.
    """

    def __init__(
        self,
        lease: Lease,
        owner: str,
        *,
        ttl_ms: int,
        heartbeat_ms: int,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        _check_ttl(ttl_ms)
        if (
            isinstance(heartbeat_ms, bool)
            or not isinstance(heartbeat_ms, int)
            or not 0 < heartbeat_ms < ttl_ms
        ):
            raise InvalidArgument(
                f"heartbeat_ms must be positive and shorter than ttl_ms ({ttl_ms}), got {heartbeat_ms!r}."
            )
        self.lease = lease
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.heartbeat_ms = heartbeat_ms
        self.on_lost = on_lost
        self._lock = threading.Lock()
        self._last_ok: dict[str, float] = {}  # key -> monotonic time of the last successful renewal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-heartbeat-{owner}", daemon=True)

    def start(self) -> Heartbeat:
        """Start the thread (once); returns self."""
        self._thread.start()
        return self

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, key: str) -> None:
        """Keep renewing ``key``; the caller must have just acquired it."""
        with self._lock:
            self._last_ok[key] = time.monotonic()

    def discard(self, key: str) -> None:
        """Stop renewing ``key`` (does not release it)."""
        with self._lock:
            self._last_ok.pop(key, None)

    def held(self) -> set[str]:
        """The keys currently being renewed."""
        with self._lock:
            return set(self._last_ok)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop renewing and join the thread; leases then expire on their own unless released."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_ms / 1000):
            self.beat()

    def beat(self) -> None:
        """Renew every held lease once (the thread's body; callable directly in tests)."""
        for key in sorted(self.held()):
            sent = time.monotonic()  # the new TTL runs from no earlier than this
            try:
                renewed = self.lease.renew(key, self.owner, self.ttl_ms)
            except redis.RedisError as exc:
                log.warning("lease renewal of %s failed: %s", key, exc)
                with self._lock:
                    last = self._last_ok.get(key)
                if last is None or (time.monotonic() - last) * 1000 < self.ttl_ms:
                    continue  # may still be ours: retry on the next beat
                renewed = False
            if renewed:
                with self._lock:
                    if key in self._last_ok:
                        self._last_ok[key] = sent
                continue
            with self._lock:
                # Discarded meanwhile (e.g. released on purpose): not a loss.
                lost = self._last_ok.pop(key, None) is not None
            if lost:
                log.warning("lease %s lost by %s", key, self.owner)
                if self.on_lost is not None:
                    try:
                        self.on_lost(key)
                    except Exception:
                        log.exception("on_lost callback failed for %s", key)
