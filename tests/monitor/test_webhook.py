"""Webhook deliveries to real loopback receivers: signatures, retries, dead letters, bounds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pytest
import redis.asyncio
from aiohttp import web

from services.monitor.rules import Alert, RuleStore
from services.monitor.webhook import (
    CLOSED,
    DELIVERY_HEADER,
    QUEUE_FULL,
    SIGNATURE_HEADER,
    WebhookLimits,
    WebhookSender,
    forbidden_address,
    signature_header,
    verify_signature,
)

Run = Callable[[Any], Any]
FAST: dict[str, Any] = {
    "backoff_base_seconds": 0.01,
    "backoff_cap_seconds": 0.02,
    "timeout_seconds": 2.0,
    "allow_private": True,
}


def alert(n: int = 1, tenant: str = "acme") -> Alert:
    return Alert(
        f"{n:013d}-abcdef0123", tenant, "cam-1", "alarm", "match", "An alarm rings.", 0.0, 10.0, 1e9, f"{n}-0"
    )


class Receiver:
    """An HTTP server on 127.0.0.1 that records each request and answers ``status`` (after ``delay`` s,
    or once ``release`` is set when ``hold``)."""

    def __init__(self, status: int = 200, delay: float = 0.0, hold: bool = False) -> None:
        self.status, self.delay, self.hold = status, delay, hold
        self.release = asyncio.Event()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.runner = web.AppRunner(self._app(), shutdown_timeout=1.0)
        self.url = ""

    def _app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            self.requests.append((dict(request.headers), await request.read()))
            if self.hold:
                await asyncio.wait_for(self.release.wait(), 10)
            await asyncio.sleep(self.delay)
            return web.Response(status=self.status)

        app = web.Application()
        app.router.add_post("/hook", hook)
        return app

    async def __aenter__(self) -> Receiver:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release.set()
        await self.runner.cleanup()


def test_signatures() -> None:
    body = b'{"alert_id":"x"}'
    header = signature_header("secret-0123456789", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    ok: dict[str, Any] = dict(secret="secret-0123456789", header=header, body=body, now=1_700_000_100)
    assert verify_signature(**ok)
    assert not verify_signature(**{**ok, "body": body + b" "})
    assert not verify_signature(**{**ok, "secret": "another-secret-xx"})
    assert not verify_signature(**{**ok, "now": 1_700_000_301})
    assert not verify_signature(**{**ok, "now": 1_699_999_699})
    rotated = f"{header},v1={'0' * 64}"
    assert verify_signature("secret-0123456789", rotated, body, now=1_700_000_000)
    for bad in ("", "t=1700000000", "v1=" + header.split("v1=")[1], "t=abc,v1=00", "t=１,v1=é"):
        assert not verify_signature("secret-0123456789", bad, body, now=1_700_000_000)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not a public"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("8.8.8.8", ""),
        ("2001:4860:4860::8888", ""),
    ],
)
def test_forbidden_addresses(address: str, why: str) -> None:
    got = forbidden_address(address)
    assert (why in got and bool(got)) if why else got == ""


def test_a_delivery_is_signed_and_verifiable(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        store = RuleStore(client)
        secret = await store.ensure_webhook_secret("acme")
        sender = WebhookSender(client, store, WebhookLimits(**FAST))
        try:
            async with Receiver() as rx:
                a = alert()
                assert await sender.submit(a, rx.url)
                assert await sender.flush(5)
        finally:
            await sender.close()
        [(headers, body)] = rx.requests
        assert Alert.from_json(body) == a and json.loads(body)["alert_id"] == a.alert_id
        assert headers["Content-Type"] == "application/json" and headers[DELIVERY_HEADER] == a.alert_id
        signature = headers[SIGNATURE_HEADER]
        assert verify_signature(secret, signature, body)
        assert not verify_signature(secret, signature, body.replace(b"alarm", b"alarn"))
        assert not verify_signature(secret, signature, body, now=time.time() + 400)
        assert (sender.delivered, sender.retried, sender.dead_lettered) == (1, 0, 0)
        assert await sender.dead_letters("acme") == []

    run_redis(scenario)


def test_failures_are_retried_then_dead_lettered(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        store = RuleStore(client)
        sender = WebhookSender(client, store, WebhookLimits(max_attempts=4, **FAST))
        try:
            async with Receiver(status=500) as rx:
                a = alert()
                assert await sender.submit(a, rx.url)
                assert await sender.flush(5)
        finally:
            await sender.close()
        assert len(rx.requests) == 4
        assert len({h[SIGNATURE_HEADER] for h, _ in rx.requests}) >= 1
        [dead] = await sender.dead_letters("acme")
        assert (dead.alert, dead.url, dead.attempts, dead.error) == (a, rx.url, 4, "HTTP 500")
        assert (sender.delivered, sender.retried, sender.dead_lettered) == (0, 3, 1)
        assert await sender.dead_letters("globex") == []

    run_redis(scenario)


def test_timeouts_and_connection_errors_are_failures(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        limits = WebhookLimits(max_attempts=2, **{**FAST, "timeout_seconds": 0.2})
        sender = WebhookSender(client, RuleStore(client), limits)
        try:
            async with Receiver(delay=1.0) as slow:
                await sender.submit(alert(1), slow.url)
                assert await sender.flush(5)
            async with Receiver() as gone:
                url = gone.url
            await sender.submit(alert(2), url)  # nothing listens there any more
            assert await sender.flush(5)
        finally:
            await sender.close()
        assert len(slow.requests) == 2
        closed, timed_out = await sender.dead_letters("acme")
        assert timed_out.error == "timeout after 0.2 s" and timed_out.attempts == 2
        assert closed.error.startswith("connection error") and closed.attempts == 2

    run_redis(scenario)


def test_a_full_queue_dead_letters_at_once(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        limits = WebhookLimits(queue_size=2, workers=1, **FAST)
        sender = WebhookSender(client, RuleStore(client), limits)
        try:
            async with Receiver() as rx:
                assert await sender.submit(alert(1), rx.url) and await sender.submit(alert(2), rx.url)
                start = time.monotonic()
                assert not await sender.submit(alert(3), rx.url)
                assert time.monotonic() - start < 0.5
                assert await sender.flush(5)
        finally:
            await sender.close()
        assert sorted(Alert.from_json(b).alert_id for _, b in rx.requests) == [
            alert(1).alert_id,
            alert(2).alert_id,
        ]
        [dead] = await sender.dead_letters("acme")
        assert (dead.alert, dead.error, dead.attempts) == (alert(3), QUEUE_FULL, 0)

    run_redis(scenario)


def test_private_targets_are_refused_unless_allowed(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        limits = WebhookLimits(**{**FAST, "allow_private": False})
        sender = WebhookSender(client, RuleStore(client), limits)
        try:
            async with Receiver() as rx:
                await sender.submit(alert(1), rx.url)
                await sender.submit(alert(2), f"http://localhost:{rx.port}/hook")
                await sender.submit(alert(3), "http://10.1.2.3/hook")
                assert await sender.flush(5)
        finally:
            await sender.close()
        assert rx.requests == []
        errors = {d.alert.alert_id: d.error for d in await sender.dead_letters("acme")}
        assert errors == {
            alert(1).alert_id: "refused: 127.0.0.1 is a loopback address",
            alert(
                2
            ).alert_id: "refused: localhost resolves to a forbidden address (127.0.0.1 is a loopback address)",
            alert(3).alert_id: "refused: 10.1.2.3 is a private address",
        }
        assert sender.refused == 3 and sender.delivered == 0

    run_redis(scenario)


def test_close_dead_letters_what_was_not_delivered(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        sender = WebhookSender(client, RuleStore(client), WebhookLimits(workers=1, **FAST))
        async with Receiver(hold=True) as rx:
            for n in (1, 2, 3):
                assert await sender.submit(alert(n), rx.url)
            for _ in range(200):  # the worker has the first one in flight
                if rx.requests:
                    break
                await asyncio.sleep(0.01)
            assert len(rx.requests) == 1
            await sender.close()
        assert sender._session is not None and sender._session.closed
        assert not await sender.submit(alert(4), rx.url)
        dead = await sender.dead_letters("acme")
        assert sorted(d.alert.alert_id for d in dead) == [alert(n).alert_id for n in (1, 2, 3, 4)]
        assert {d.error for d in dead} == {CLOSED}

    run_redis(scenario)
