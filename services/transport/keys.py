"""Redis key names and transport defaults, in one place.

Every key the services touch is built here, under ``PREFIX``. Per-session keys share the
``mdl:s:{<sid>}:`` prefix: the braces are a Redis Cluster hash tag, so every key of one session
(tokens, captions, state, lease, config, counters) lives in one hash slot, and a Lua script or a
MULTI over them is legal on a Cluster. A job's keys share ``mdl:job:{<id>}`` the same way.
Scripts touch the keys of one tag only (``same_slot`` checks it, on every Redis, not only on a
Cluster). Global keys (the active-session set, the dead-letter stream...) are each their own slot
and are only used by single-key commands.
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
COUNTERS_PREFIX = f"{PREFIX}:counters:"
"""Prefix of the counter hashes (``counters_key``): one per hash tag, ``dropped:<name>`` and
``deadletters`` fields; ``StreamClient.counters()`` sums them."""
JOBS_STREAM = f"{PREFIX}:jobs"
"""Stream of training jobs (jobs API -> training workers)."""
JOB_GROUP = "trainers"
"""Consumer group of the training workers on ``JOBS_STREAM``."""
JOBS_INDEX = f"{PREFIX}:jobs:index"
"""Sorted set of every job id (score 0, ids sort by creation time)."""
ADAPTERS = f"{PREFIX}:adapters"
"""Hash of registered adapters: name -> Adapter JSON."""


_SESSION_PREFIX = f"{PREFIX}:s:{{"


def _session(sid: str, suffix: str) -> str:
    if not isinstance(sid, str) or not sid or any(ch.isspace() or ch in "{}" for ch in sid):
        raise InvalidArgument(
            f"A session id must be a non-empty string without whitespace or braces, got {sid!r}."
        )
    return f"{_SESSION_PREFIX}{sid}}}:{suffix}"


def hash_tag(key: str) -> str:
    """The part of ``key`` that Redis Cluster hashes to pick its slot: the text between the first
    ``{`` and the next ``}`` when it is not empty, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def same_slot(*keys: str) -> bool:
    """True when every key has the same hash tag, so one script or MULTI may touch them all on a
    Redis Cluster (the rule is checked on every Redis, so a cross-slot script fails in tests)."""
    return len({hash_tag(k) for k in keys}) <= 1


def session_of(key: str) -> str | None:
    """The session id of a per-session key, else None."""
    if not key.startswith(_SESSION_PREFIX):
        return None
    tag = hash_tag(key)
    return tag if key.startswith(f"{_SESSION_PREFIX}{tag}}}:") else None


def counters_key(key: str) -> str:
    """Hash of the counters kept beside ``key``, in its slot: drops of a capped stream
    (``dropped:<name>``) and dead letters. A session's counters expire with the session."""
    return f"{COUNTERS_PREFIX}{{{hash_tag(key)}}}"


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


def session_keys(sid: str) -> tuple[str, ...]:
    """Every key a session owns (all in one slot), for listing or expiring them together."""
    return (
        session_tokens(sid),
        session_captions(sid),
        session_state(sid),
        session_lease(sid),
        session_config(sid),
        counters_key(session_tokens(sid)),
    )


def _job(job_id: str, suffix: str = "") -> str:
    if (
        not isinstance(job_id, str)
        or not job_id
        or len(job_id) > 64
        or any(c.isspace() or c in ":{}" for c in job_id)
    ):
        raise InvalidArgument(
            f"A job id must be 1 to 64 characters without whitespace, ':' or braces, got {job_id!r}."
        )
    return f"{PREFIX}:job:{{{job_id}}}{suffix}"


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

    Streams are trimmed exactly at their ``*_maxlen`` and each trimmed entry is counted in the
    stream's ``counters_key``. ``heartbeat_ms`` must be shorter than ``lease_ttl_ms`` so that a live worker
    renews before its lease expires. An entry delivered more than ``max_deliveries`` times is
    dead-lettered.
    """

    ENV_GROUP: ClassVar[str] = "TRANSPORT"

    tokens_maxlen: Annotated[int, "audio-token publications kept per session stream"] = 2000
    captions_maxlen: Annotated[int, "caption events kept per session stream"] = 5000
    deadletter_maxlen: Annotated[int, "entries kept in the dead-letter stream"] = 10000
    deadletter_ttl_s: Annotated[int, "s a dead letter is kept (trimmed by age at the next one)"] = 7 * 86400
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


# --- monitoring (rules, alerts, clips, history) ---

_MONITOR_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
ANONYMOUS_TENANT_SEGMENT = "~"
"""Key segment of the anonymous tenant (""); ``~`` is not a tenant-name character, so it cannot
collide with a named tenant."""


def monitor_name_ok(name: str) -> bool:
    """Whether ``name`` matches ``^[A-Za-z0-9._-]{1,64}$`` (tenants, rule, question and alert ids)."""
    return isinstance(name, str) and 0 < len(name) <= 64 and all(c in _MONITOR_NAME_CHARS for c in name)


def _tenant(tenant: str, suffix: str) -> str:
    if tenant == "":
        segment = ANONYMOUS_TENANT_SEGMENT
    elif monitor_name_ok(tenant):
        segment = tenant
    else:
        raise InvalidArgument(f"A tenant must match ^[A-Za-z0-9._-]{{1,64}}$ (or be empty), got {tenant!r}.")
    return f"{PREFIX}:t:{{{segment}}}:{suffix}"


def monitor_rules(tenant: str) -> str:
    """Hash of a tenant's monitoring rules: rule id -> rule JSON."""
    return _tenant(tenant, "rules")


def monitor_rules_version(tenant: str) -> str:
    """Counter bumped on every change of the tenant's rules (INCR)."""
    return _tenant(tenant, "rules:version")


def monitor_webhook_secret(tenant: str) -> str:
    """String: the secret that signs the tenant's webhook deliveries."""
    return _tenant(tenant, "webhook:secret")


def monitor_webhook_deadletters(tenant: str) -> str:
    """Capped stream of the tenant's webhook deliveries that failed for good."""
    return _tenant(tenant, "webhook:deadletter")


def monitor_clips(tenant: str) -> str:
    """Sorted set indexing the tenant's alert clips: alert id -> stored at, unix milliseconds."""
    return _tenant(tenant, "clips")


def monitor_clip_prefix(tenant: str) -> str:
    """Prefix of the tenant's clip keys (``monitor_clip`` = prefix + alert id), for eviction scripts."""
    return _tenant(tenant, "clip:")


def monitor_clip(tenant: str, alert_id: str) -> str:
    """String with TTL: one alert's audio clip, a 16-bit mono WAV file."""
    if not monitor_name_ok(alert_id):
        raise InvalidArgument(f"An alert id must match ^[A-Za-z0-9._-]{{1,64}}$, got {alert_id!r}.")
    return monitor_clip_prefix(tenant) + alert_id


def monitor_history(tenant: str) -> str:
    """Sorted set of the tenant's caption/answer/alert history: entry JSON -> wall time, unix ms."""
    return _tenant(tenant, "history")


def monitor_alerts(tenant: str) -> str:
    """Capped stream of the tenant's alerts (the alert JSON in field ``alert``), newest last."""
    return _tenant(tenant, "alerts")


def monitor_alert_once(tenant: str, digest: str) -> str:
    """String with TTL claiming one firing (rule, stream, event): a firing replayed after a gateway
    failover is not alerted twice. ``digest`` is a hex hash of what fired."""
    if not digest.isalnum():
        raise InvalidArgument(f"an alert digest is hex, got {digest!r}")
    return _tenant(tenant, f"fired:{digest}")


def monitor_levels(tenant: str) -> str:
    """Hash of the tenant's live audio levels: session id -> "dBFS unix_s" (the gateway taking its
    audio writes it every second; the monitoring view reads it)."""
    return _tenant(tenant, "levels")
