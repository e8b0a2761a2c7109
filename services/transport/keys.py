"""Redis key names and transport defaults, in one place.

Every key the services touch is built here, under ``PREFIX``. Per-session keys share the
``mdl:s:<sid>:`` prefix so a session's footprint can be listed (and expired) together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from services.errors import ConfigError, InvalidArgument

PREFIX = "mdl"

ACTIVE_SESSIONS = f"{PREFIX}:sessions:active"
"""Sorted set: session id -> last activity, unix milliseconds."""
DEAD_LETTERS = f"{PREFIX}:deadletter"
"""Stream of entries that could not be processed, with the reason (capped)."""
COUNTERS = f"{PREFIX}:counters"
"""Hash of counted drops (``dropped:<stream>``) and dead letters (``deadletters``)."""
JOBS_STREAM = f"{PREFIX}:jobs"
"""Stream of training jobs (jobs API -> training workers)."""


def _session(sid: str, suffix: str) -> str:
    if not isinstance(sid, str) or not sid or any(ch.isspace() for ch in sid):
        raise InvalidArgument(f"A session id must be a non-empty string without whitespace, got {sid!r}.")
    return f"{PREFIX}:s:{sid}:{suffix}"


def session_tokens(sid: str) -> str:
    """Stream of audio-token embeddings for one session (encoder -> LM worker)."""
    return _session(sid, "tokens")


def session_captions(sid: str) -> str:
    """Stream of caption events for one session (LM worker -> gateway)."""
    return _session(sid, "captions")


def session_state(sid: str) -> str:
    """Hash of a session's durable state (``last_seq`` and worker fields); expires after idling."""
    return _session(sid, "state")


def session_lease(sid: str) -> str:
    """String key holding the owner token of the LM worker that serves the session (PX TTL)."""
    return _session(sid, "lease")


def session_config(sid: str) -> str:
    """Hash of the session's configuration (prompt, adapter, schedule)."""
    return _session(sid, "config")


@dataclass(frozen=True)
class TransportDefaults:
    """Caps, TTLs and timeouts of the Redis transport; every number carries its unit.

    Streams are trimmed exactly at their ``*_maxlen`` and each trimmed entry is counted in
    ``COUNTERS``. ``heartbeat_ms`` must be shorter than ``lease_ttl_ms`` so that a live worker
    renews before its lease expires. An entry delivered more than ``max_deliveries`` times is
    dead-lettered.
    """

    tokens_maxlen: int = 2000
    captions_maxlen: int = 5000
    deadletter_maxlen: int = 10000
    lease_ttl_ms: int = 3000
    heartbeat_ms: int = 1000
    claim_min_idle_ms: int = 5000
    max_deliveries: int = 3
    block_ms: int = 200
    session_ttl_s: int = 3600

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TransportDefaults.{f.name} must be a positive integer, got {value!r}.")
        if self.heartbeat_ms >= self.lease_ttl_ms:
            raise ConfigError(
                f"TransportDefaults.heartbeat_ms ({self.heartbeat_ms}) must be shorter than "
                f"lease_ttl_ms ({self.lease_ttl_ms}), or a live owner would lose its lease."
            )
