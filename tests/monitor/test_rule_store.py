"""RuleStore on a real Redis: round trip, bounds, versions, secrets, tenant isolation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from services.errors import InvalidArgument, NotFound, ResourceExhausted
from services.monitor.limits import MonitorLimits
from services.monitor.rules import Rule, RuleStore, SyncRuleStore
from services.transport import keys

Run = Callable[[Any], Any]


def test_monitor_keys_share_the_tenant_slot_and_refuse_bad_tenants() -> None:
    tenant_keys = [
        keys.monitor_rules("acme"),
        keys.monitor_rules_version("acme"),
        keys.monitor_webhook_secret("acme"),
        keys.monitor_webhook_deadletters("acme"),
        keys.monitor_clips("acme"),
        keys.monitor_clip("acme", "0001-ab"),
        keys.monitor_history("acme"),
    ]
    assert keys.same_slot(*tenant_keys) and len(set(tenant_keys)) == len(tenant_keys)
    assert keys.hash_tag(keys.monitor_rules("acme")) == "acme"
    # The anonymous tenant has its own segment that no named tenant can have.
    assert keys.monitor_rules("") != keys.monitor_rules("_") and keys.hash_tag(keys.monitor_rules("")) == "~"
    for bad in ("a b", "~", "x" * 65, "a:b", "{a}"):
        with pytest.raises(InvalidArgument, match="tenant"):
            keys.monitor_rules(bad)
    with pytest.raises(InvalidArgument, match="alert id"):
        keys.monitor_clip("acme", "../x")


def test_rules_round_trip_versions_and_isolation(run_redis: Run) -> None:
    alarm = Rule("alarm", "match", pattern="alarm", webhook_url="https://hooks.example.com/a")
    baby = Rule("baby", "answer_true", source="q1")

    async def scenario(client: redis.asyncio.Redis) -> None:
        store = RuleStore(client)
        assert await store.list("acme") == [] and await store.version("acme") == 0
        assert await store.put("acme", baby) == 1
        assert await store.put("acme", alarm) == 2
        assert await store.list("acme") == [alarm, baby]
        assert await store.get("acme", "alarm") == alarm
        edited = Rule("alarm", "match", pattern="siren")
        assert await store.put("acme", edited) == 3
        assert await store.get("acme", "alarm") == edited
        # Tenant B sees nothing of tenant A's, and cannot delete it.
        assert await store.list("globex") == [] and await store.version("globex") == 0
        with pytest.raises(NotFound, match="'globex' has no rule 'alarm'"):
            await store.get("globex", "alarm")
        with pytest.raises(NotFound):
            await store.delete("globex", "alarm")
        assert await store.list("") == []
        await store.put("", alarm)
        assert await store.list("") == [alarm] and await store.list("acme") == [edited, baby]
        # Delete bumps the version; deleting again is NotFound and does not.
        assert await store.delete("acme", "alarm") == 4
        with pytest.raises(NotFound):
            await store.delete("acme", "alarm")
        assert await store.version("acme") == 4 and await store.list("acme") == [baby]
        with pytest.raises(InvalidArgument, match="rule_id must match"):
            await store.get("acme", "no such id!")

    run_redis(scenario)


def test_rules_per_tenant_are_bounded(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        store = RuleStore(client, MonitorLimits(max_rules=3))
        for i in range(3):
            await store.put("acme", Rule(f"r{i}", "changed"))
        with pytest.raises(ResourceExhausted, match="already has 3 rules"):
            await store.put("acme", Rule("r3", "changed"))
        assert await store.version("acme") == 3 and len(await store.list("acme")) == 3
        await store.put("acme", Rule("r1", "changed", enabled=False))  # replacing one is allowed
        await store.put("globex", Rule("r3", "changed"))  # another tenant has its own bound
        await store.delete("acme", "r0")
        await store.put("acme", Rule("r3", "changed"))
        assert [r.rule_id for r in await store.list("acme")] == ["r1", "r2", "r3"]

    run_redis(scenario)


def test_webhook_secrets(run_redis: Run) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        store = RuleStore(client)
        assert await store.webhook_secret("acme") is None
        made = await store.ensure_webhook_secret("acme")
        assert len(made) >= 32 and await store.ensure_webhook_secret("acme") == made
        assert await store.webhook_secret("acme") == made
        assert await store.webhook_secret("globex") is None
        await store.set_webhook_secret("globex", "s" * 16)
        assert await store.ensure_webhook_secret("globex") == "s" * 16
        for bad in ("short", "has space in it!!", "x" * 257):
            with pytest.raises(InvalidArgument, match="webhook secret"):
                await store.set_webhook_secret("acme", bad)
        assert await store.webhook_secret("acme") == made

    run_redis(scenario)


def test_the_sync_store_reads_what_the_async_one_wrote(redis_url: str, run_redis: Run) -> None:
    rule = Rule("quiet", "silence", silence_seconds=5)

    async def write(client: redis.asyncio.Redis) -> str:
        await RuleStore(client).put("acme", rule)
        return await RuleStore(client).ensure_webhook_secret("acme")

    secret = run_redis(write)
    client = redis.Redis.from_url(redis_url)
    try:
        store = SyncRuleStore(client, MonitorLimits(max_rules=2))
        assert (
            store.list("acme") == [rule] and store.get("acme", "quiet") == rule and store.version("acme") == 1
        )
        assert store.ensure_webhook_secret("acme") == secret == store.webhook_secret("acme")
        assert store.put("acme", Rule("b", "changed")) == 2
        with pytest.raises(ResourceExhausted):
            store.put("acme", Rule("c", "changed"))
        assert store.delete("acme", "b") == 3
        with pytest.raises(NotFound):
            store.get("globex", "quiet")
        store.set_webhook_secret("globex", "t" * 20)
        assert store.webhook_secret("globex") == "t" * 20
    finally:
        client.close()
