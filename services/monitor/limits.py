"""Bounds of the monitoring stores: rules, clips, history and the audio kept for clips."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar

from services.errors import ConfigError

DAY_SECONDS = 86400


def check_positive(settings: Any) -> None:
    """ConfigError unless every int field of a settings dataclass is a positive int and every
    float field a positive finite number (bool fields are not checked)."""
    hints = typing.get_type_hints(type(settings))
    for f in fields(settings):
        kind, value = hints[f.name], getattr(settings, f.name)
        if kind is bool:
            continue
        number = int if kind is int else int | float
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"{type(settings).__name__}.{f.name} must be a positive {kind.__name__}, got {value!r}."
            )


@dataclass(frozen=True)
class MonitorLimits:
    """Caps and retention of the monitoring stores; every number carries its unit."""

    ENV_GROUP: ClassVar[str] = "MONITOR"
    FLAG_PREFIX: ClassVar[str] = "monitor-"  # --monitor-max-rules, ...

    max_rules: Annotated[int, "monitoring rules per tenant"] = 100
    history_retention_seconds: Annotated[int, "s a history entry is kept"] = 7 * DAY_SECONDS
    history_max_entries: Annotated[int, "history entries kept per tenant (oldest trimmed)"] = 100_000
    history_scan_max: Annotated[int, "history entries one search reads at most"] = 20_000
    clip_ttl_seconds: Annotated[int, "s an alert's audio clip is kept"] = 7 * DAY_SECONDS
    max_clip_seconds: Annotated[float, "s of audio per alert clip at most (the newest kept)"] = 30.0
    max_clips: Annotated[int, "alert clips kept per tenant (oldest evicted)"] = 100
    ring_seconds: Annotated[float, "s of each stream's audio kept in memory for clips"] = 60.0

    def __post_init__(self) -> None:
        check_positive(self)
