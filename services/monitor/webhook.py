"""Signed webhook deliveries of alerts, with retries and a dead-letter stream per tenant.

``WebhookSender.submit`` queues an alert for its rule's URL without waiting (a full queue
dead-letters it at once). Workers POST the alert's JSON, signed with the tenant's secret::

    X-Midasheng-Delivery: <alert_id>
    X-Midasheng-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, b"<t>." + body)>

and retry anything but a 2xx with exponential backoff and jitter, then dead-letter it into
the tenant's capped stream. Targets that resolve to loopback, private, link-local, multicast
or reserved addresses are refused unless ``allow_private``; the connection goes to the address
that was checked, so a DNS answer that changes in between cannot slip past.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Annotated, ClassVar, Protocol

import aiohttp
import redis
import redis.asyncio
from aiohttp.abc import AbstractResolver, ResolveResult

from services.errors import ConfigError
from services.monitor.limits import check_positive
from services.monitor.rules import Alert
from services.transport import keys

log = logging.getLogger(__name__)

DELIVERY_HEADER = "X-Midasheng-Delivery"
SIGNATURE_HEADER = "X-Midasheng-Signature"
QUEUE_FULL = "queue full"
CLOSED = "sender closed before delivery"


@dataclass(frozen=True)
class WebhookLimits:
    """How alerts are delivered to webhooks: queue, attempts, backoff, dead letters, targets."""

    ENV_GROUP: ClassVar[str] = "WEBHOOK"
    FLAG_PREFIX: ClassVar[str] = "webhook-"  # --webhook-queue-size, ...

    queue_size: Annotated[int, "deliveries waiting at most (more are dead-lettered)"] = 1000
    workers: Annotated[int, "deliveries in flight at once"] = 4
    timeout_seconds: Annotated[float, "s one delivery attempt may take"] = 5.0
    max_attempts: Annotated[int, "attempts of a delivery before it is dead-lettered"] = 5
    backoff_base_seconds: Annotated[float, "s before the first retry (doubling each retry, with jitter)"] = (
        0.5
    )
    backoff_cap_seconds: Annotated[float, "s between retries at most"] = 30.0
    deadletter_maxlen: Annotated[int, "failed deliveries kept per tenant (approximately)"] = 1000
    allow_private: Annotated[bool, "deliver to loopback/private/link-local addresses too"] = False

    def __post_init__(self) -> None:
        check_positive(self)
        if not isinstance(self.allow_private, bool):
            raise ConfigError(f"WebhookLimits.allow_private must be a bool, got {self.allow_private!r}.")
        if self.backoff_cap_seconds < self.backoff_base_seconds:
            raise ConfigError("WebhookLimits.backoff_cap_seconds must not be below backoff_base_seconds.")


def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, t: int) -> str:
    """The ``X-Midasheng-Signature`` value of ``body`` sent at unix second ``t``."""
    return f"t={t},v1={_mac(secret, t, body)}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_seconds: float = 300, now: float | None = None
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_seconds`` of ``now``."""
    t: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            t = int(value)
        elif name == "v1":
            candidates.append(value.encode())
    if t is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_seconds:
        return False
    expected = _mac(secret, t, body).encode()
    return any(hmac.compare_digest(expected, c) for c in candidates)


def forbidden_address(address: str) -> str:
    """Why a webhook may not go to ``address`` ("" = it may): loopback, private, ..."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    for what in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{what}"):
            return f"{ip} is a {what.replace('_', '-')} address"
    return "" if ip.is_global else f"{ip} is not a public address"


def _str(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class RefusedTarget(OSError):
    """A webhook target that resolves to an address deliveries may not go to."""


class _GuardedResolver(AbstractResolver):
    """Resolves with the system resolver and refuses a name when any of its addresses is not public."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            why = forbidden_address(r["host"])
            if why:
                raise RefusedTarget(f"{host.rstrip('.')} resolves to a forbidden address ({why})")
        return results

    async def close(self) -> None:
        await self._inner.close()


class SecretSource(Protocol):
    async def ensure_webhook_secret(self, tenant: str) -> str: ...


@dataclass(frozen=True)
class DeadLetter:
    """A delivery that failed for good."""

    entry_id: str
    alert: Alert
    url: str
    attempts: int
    error: str
    wall_time: float


@dataclass(eq=False)
class _Delivery:
    alert: Alert
    url: str
    attempts: int = 0
    error: str = ""


class WebhookSender:
    """Delivers alerts to webhooks from a bounded queue (see the module docstring).

    Counters: ``delivered``, ``retried`` (attempts after a failure), ``refused`` (targets not
    allowed) and ``dead_lettered``. Use from one event loop; ``close()`` it before its Redis client.
    """

    def __init__(
        self, client: redis.asyncio.Redis, secrets: SecretSource, limits: WebhookLimits | None = None
    ) -> None:
        self.client = client
        self.secrets = secrets
        self.limits = limits or WebhookLimits()
        self.delivered = self.retried = self.refused = self.dead_lettered = 0
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(self.limits.queue_size)
        self._in_flight: set[_Delivery] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._resolver: _GuardedResolver | None = None
        self._closed = False

    async def submit(self, alert: Alert, url: str) -> bool:
        """Queue a delivery; False when it was dead-lettered instead (queue full, sender closed).
        InvalidArgument for an alert whose tenant is not a valid tenant name."""
        keys.monitor_webhook_deadletters(alert.tenant)
        delivery = _Delivery(alert, url)
        if self._closed:
            await self._dead_letter(delivery, CLOSED)
            return False
        self._start()
        try:
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            await self._dead_letter(delivery, QUEUE_FULL)
            return False
        return True

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued delivery is done (delivered or dead-lettered); False on timeout."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the workers, dead-letter what was not delivered yet and close the HTTP session."""
        if self._closed:
            return
        self._closed = True
        undelivered = list(self._in_flight)
        while not self._queue.empty():
            undelivered.append(self._queue.get_nowait())
            self._queue.task_done()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        for delivery in undelivered:
            await self._dead_letter(delivery, CLOSED)
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def dead_letters(self, tenant: str, count: int = 100) -> list[DeadLetter]:
        """The tenant's newest dead letters, newest first."""
        entries = await self.client.xrevrange(keys.monitor_webhook_deadletters(tenant), "+", "-", count=count)
        out = []
        for entry_id, raw in entries:
            f = {_str(k): _str(v) for k, v in raw.items()}
            out.append(
                DeadLetter(
                    _str(entry_id),
                    Alert.from_json(f["alert"]),
                    f["url"],
                    int(f["attempts"]),
                    f["error"],
                    float(f["wall_time"]),
                )
            )
        return out

    def _start(self) -> None:
        if self._workers:
            return
        self._resolver = None if self.limits.allow_private else _GuardedResolver()
        connector = aiohttp.TCPConnector(resolver=self._resolver, limit=self.limits.workers)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhook-{i}") for i in range(self.limits.workers)
        ]

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            self._in_flight.add(delivery)
            try:
                await self._deliver(delivery)
            except Exception as e:  # a bug here must not stop the worker
                log.exception("webhook delivery of alert %s failed", delivery.alert.alert_id)
                await self._dead_letter(delivery, f"internal error: {e!r}")
            finally:
                self._in_flight.discard(delivery)
                self._queue.task_done()

    async def _deliver(self, d: _Delivery) -> None:
        refusal = self._refusal(d.url)
        if refusal:
            self.refused += 1
            await self._dead_letter(d, f"refused: {refusal}")
            return
        body = d.alert.to_json().encode()
        limits = self.limits
        for attempt in range(1, limits.max_attempts + 1):
            d.attempts = attempt
            try:
                secret = await asyncio.wait_for(
                    self.secrets.ensure_webhook_secret(d.alert.tenant), limits.timeout_seconds
                )
                d.error = await self._post(d, body, secret)
            except RefusedTarget as e:
                self.refused += 1
                await self._dead_letter(d, f"refused: {e}")
                return
            except (TimeoutError, redis.RedisError) as e:
                d.error = f"webhook secret unavailable: {e!r}"
            if not d.error:
                self.delivered += 1
                return
            if attempt < limits.max_attempts:
                self.retried += 1
                delay = min(limits.backoff_cap_seconds, limits.backoff_base_seconds * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(delay / 2, delay))
        await self._dead_letter(d, d.error)

    def _refusal(self, url: str) -> str:
        """Why ``url`` may not be posted to, when its host says so without a DNS lookup."""
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError as e:
            return f"not a valid URL: {e}"
        if parts.scheme not in ("http", "https") or not host:
            return "not an http(s) URL with a host"
        if self.limits.allow_private:
            return ""
        try:
            return forbidden_address(host)
        except ValueError:  # a name: the resolver checks its addresses
            return ""

    async def _post(self, d: _Delivery, body: bytes, secret: str) -> str:
        """One attempt; "" on a 2xx, else what went wrong. Raises RefusedTarget."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: d.alert.alert_id,
            SIGNATURE_HEADER: signature_header(secret, body, int(time.time())),
        }
        timeout = aiohttp.ClientTimeout(total=self.limits.timeout_seconds)
        try:
            async with self._session.post(
                d.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, RefusedTarget):
                raise e.os_error from None
            return f"connection error: {e}"
        except TimeoutError:
            return f"timeout after {self.limits.timeout_seconds:g} s"
        except aiohttp.ClientError as e:
            return f"request failed: {e!r}"

    async def _dead_letter(self, d: _Delivery, error: str) -> None:
        self.dead_lettered += 1
        fields_ = {
            "alert": d.alert.to_json(),
            "url": d.url,
            "attempts": str(d.attempts),
            "error": error,
            "wall_time": f"{time.time():.3f}",
        }
        try:
            await asyncio.wait_for(
                self.client.xadd(
                    keys.monitor_webhook_deadletters(d.alert.tenant),
                    fields_,
                    maxlen=self.limits.deadletter_maxlen,
                    approximate=True,
                ),
                self.limits.timeout_seconds,
            )
        except (TimeoutError, redis.RedisError) as e:
            log.warning("could not dead-letter webhook delivery of alert %s: %r", d.alert.alert_id, e)
        log.info("webhook delivery of alert %s dead-lettered: %s", d.alert.alert_id, error)
