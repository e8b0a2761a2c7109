from __future__ import annotations

import pytest

from services.config import from_env
from services.errors import ConfigError
from services.monitor.limits import MonitorLimits
from services.monitor.webhook import WebhookLimits


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (MonitorLimits, {"max_rules": 0}, "max_rules must be a positive int"),
        (MonitorLimits, {"max_clips": 2.5}, "max_clips must be a positive int"),
        (MonitorLimits, {"ring_seconds": float("nan")}, "ring_seconds must be a positive float"),
        (WebhookLimits, {"workers": 2.0}, "workers must be a positive int"),
        (WebhookLimits, {"queue_size": 0}, "queue_size"),
        (WebhookLimits, {"allow_private": 1}, "allow_private must be a bool"),
        (WebhookLimits, {"backoff_base_seconds": 2.0, "backoff_cap_seconds": 1.0}, "backoff_cap_seconds"),
    ],
)
def test_limits_are_validated(cls: type, values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDASHENG_MONITOR_MAX_RULES", "7")
    monkeypatch.setenv("MIDASHENG_WEBHOOK_ALLOW_PRIVATE", "true")
    assert from_env(MonitorLimits).max_rules == 7 and from_env(WebhookLimits).allow_private is True
