"""Redis key names and transport defaults, in one place.

Every key the services touch is built here, under ``PREFIX``. Per-session keys share the
``mdl:s:<sid>:`` prefix so a session's footprint can be listed (and expired) together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, ClassVar

from services.errors import ConfigError, InvalidArgument

PREFIX = "mdl"

ACTIVE_SESSIONS = f"{PREFIX}:sessions:active"
"""Sorted set: session id -> last activity, unix milliseconds."""
LM_WORKERS = f"{PREFIX}:lm:workers"
"""Hash: LM worker id -> its load report (see ``lm_service.ownership.LoadReport``); gateways read it to admit sessions."""
DEAD_LETTERS = f"{PREFIX}:deadletter"
"""Stream of entries that could not be processed, with the reason (capped)."""
COUNTERS = f"{PREFIX}:counters"
"""Hash of counted drops (``dropped:<stream>``) and dead letters (``deadletters``)."""
JOBS_STREAM = f"{PREFIX}:jobs"
"""Stream of training jobs (jobs API -> training workers)."""
JOB_GROUP = "trainers"
"""Consumer group of the training workers on ``JOBS_STREAM``."""
JOBS_INDEX = f"{PREFIX}:jobs:index"
"""Sorted set of every job id (score 0, ids sort by creation time)."""
ADAPTERS = f"{PREFIX}:adapters"
"""Hash of registered adapters: name -> Adapter JSON."""


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


def _job(job_id: str, suffix: str = "") -> str:
    if (
        not isinstance(job_id, str)
        or not job_id
        or len(job_id) > 64
        or any(c.isspace() or c == ":" for c in job_id)
    ):
        raise InvalidArgument(
            f"A job id must be 1 to 64 characters without whitespace or ':', got {job_id!r}."
        )
    return f"{PREFIX}:job:{job_id}{suffix}"


def job_key(job_id: str) -> str:
    """Hash holding one job's document, status, cancel flag and event counter."""
    return _job(job_id)


def job_events_key(job_id: str) -> str:
    """Capped stream of one job's events."""
    return _job(job_id, ":events")


def job_lease_key(job_id: str) -> str:
    """Lease of the worker running the job."""
    return _job(job_id, ":lease")


@dataclass(frozen=True)
class TransportDefaults:
    """Caps, TTLs and timeouts of the Redis transport; every number carries its unit.

    Streams are trimmed exactly at their ``*_maxlen`` and each trimmed entry is counted in
    ``COUNTERS``. ``heartbeat_ms`` must be shorter than ``lease_ttl_ms`` so that a live worker
    renews before its lease expires. An entry delivered more than ``max_deliveries`` times is
    dead-lettered.
    """

    ENV_GROUP: ClassVar[str] = "TRANSPORT"

    tokens_maxlen: Annotated[int, "audio-token publications kept per session stream"] = 2000
    captions_maxlen: Annotated[int, "caption events kept per session stream"] = 5000
    deadletter_maxlen: Annotated[int, "entries kept in the dead-letter stream"] = 10000
    lease_ttl_ms: Annotated[int, "ms an LM worker's session lease lasts without a heartbeat"] = 3000
    heartbeat_ms: Annotated[int, "ms between lease renewals (shorter than lease_ttl_ms)"] = 1000
    claim_min_idle_ms: Annotated[int, "ms a pending entry must idle before another consumer claims it"] = 5000
    max_deliveries: Annotated[int, "deliveries of an entry before it is dead-lettered"] = 3
    block_ms: Annotated[int, "ms one blocking stream read waits at most"] = 200
    session_ttl_s: Annotated[int, "s an ended session's keys (captions for downloads) are kept"] = 3600

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
