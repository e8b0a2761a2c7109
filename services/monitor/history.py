"""Searchable history of captions, answers and alerts per tenant, and its exports.

Each tenant's history is one Redis sorted set scored by wall-clock milliseconds. A member is
the entry's compact JSON without its wall time (the score holds that), so adding the same
entry again (a resumed stream replaying its events) stores nothing new (``ZADD NX``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from services.audio.subtitles import TimedCaption
from services.audio.subtitles import to_webvtt as render_webvtt
from services.errors import InvalidArgument
from services.monitor.limits import MonitorLimits
from services.transport import keys

CAPTION, ANSWER, ALERT = "caption", "answer", "alert"
KINDS = (CAPTION, ANSWER, ALERT)
PAGE = 500  # members read per Redis call while searching
MAX_LIMIT = 1000  # entries one search returns at most

# Member field names are short: a tenant may hold 100,000 members.
_LONG = {
    "k": "kind",
    "s": "stream",
    "id": "event_id",
    "q": "question_id",
    "t": "text",
    "a": "answer",
    "ws": "window_start",
    "we": "window_end",
    "seg": "segment_id",
    "r": "rule_id",
}


@dataclass(frozen=True)
class HistoryEntry:
    """A caption, an answer to a question, or an alert, as history keeps it."""

    kind: str  # caption | answer | alert
    tenant: str
    stream: str
    event_id: str  # the caption event id (caption, answer) or the alert id (alert)
    text: str
    wall_time: float  # unix s (kept to the millisecond)
    window_start: float = 0.0  # stream s
    window_end: float = 0.0  # stream s
    question_id: str = ""
    answer: bool | None = None
    segment_id: int = 0
    rule_id: str = ""  # alerts: the rule that fired

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(
                f"a history entry's kind must be one of {', '.join(KINDS)}, got {self.kind!r}."
            )
        if not self.stream or not self.event_id:
            raise InvalidArgument("a history entry needs a stream and an event (or alert) id.")
        if not (
            math.isfinite(self.wall_time)
            and math.isfinite(self.window_start)
            and math.isfinite(self.window_end)
        ):
            raise InvalidArgument("a history entry's times must be finite.")

    def member(self) -> str:
        """The sorted-set member: everything but tenant (the key) and wall time (the score)."""
        doc: dict[str, Any] = {
            "k": self.kind,
            "s": self.stream,
            "id": self.event_id,
            "t": self.text,
            "ws": round(self.window_start, 3),
            "we": round(self.window_end, 3),
        }
        if self.question_id:
            doc["q"] = self.question_id
        if self.answer is not None:
            doc["a"] = self.answer
        if self.segment_id:
            doc["seg"] = self.segment_id
        if self.rule_id:
            doc["r"] = self.rule_id
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_member(cls, tenant: str, member: bytes | str, score_ms: float) -> HistoryEntry:
        doc = json.loads(member)
        return cls(tenant=tenant, wall_time=score_ms / 1000, **{_LONG[k]: v for k, v in doc.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tenant": self.tenant,
            "stream": self.stream,
            "event_id": self.event_id,
            "question_id": self.question_id,
            "text": self.text,
            "answer": self.answer,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "wall_time": self.wall_time,
            "segment_id": self.segment_id,
            "rule_id": self.rule_id,
        }


@dataclass(frozen=True)
class HistoryPage:
    """Entries of one search, newest first; ``before`` continues the search ("" = nothing left)."""

    entries: list[HistoryEntry]
    before: str


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


def _cursor(score: int, seen: int) -> str:
    """A position in a history: after ``seen`` members of score ``score`` (newest first)."""
    return f"{score}:{seen}"


def _parse_cursor(cursor: str) -> tuple[int, int]:
    score, sep, seen = cursor.partition(":")
    try:
        parsed = int(score), int(seen)
    except ValueError:
        parsed = (0, -1)
    if not sep or parsed[1] < 0:
        raise InvalidArgument(f"not a history cursor: {cursor!r}.")
    return parsed


class HistoryStore:
    """Per-tenant history in Redis (asyncio client).

    Every ``add`` trims the tenants it wrote to: entries older than ``history_retention_seconds``
    and the oldest beyond ``history_max_entries``. A search reads at most ``history_scan_max``
    entries per call and returns a cursor where it stopped.
    """

    def __init__(self, client: redis.asyncio.Redis, limits: MonitorLimits | None = None) -> None:
        limits = limits or MonitorLimits()
        self.client = client
        self.retention_seconds = limits.history_retention_seconds
        self.max_entries = limits.history_max_entries
        self.scan_max = limits.history_scan_max

    async def add(self, entries: Iterable[HistoryEntry]) -> int:
        """Add entries (one pipeline); how many were new."""
        by_key: dict[str, dict[str, int]] = {}
        for e in entries:
            by_key.setdefault(keys.monitor_history(e.tenant), {})[e.member()] = _ms(e.wall_time)
        if not by_key:
            return 0
        cutoff = _ms(time.time() - self.retention_seconds)
        pipe = self.client.pipeline(transaction=False)
        for key, members in by_key.items():
            pipe.zadd(key, members, nx=True)
            pipe.zremrangebyscore(key, "-inf", f"({cutoff}")
            pipe.zremrangebyrank(key, 0, -self.max_entries - 1)
            pipe.expire(key, self.retention_seconds)
        replies = await pipe.execute()
        return sum(int(r) for r in replies[::4])

    async def expire(self, tenant: str, now: float | None = None) -> int:
        """Delete the tenant's entries older than the retention at ``now`` (unix s); how many."""
        cutoff = _ms((time.time() if now is None else now) - self.retention_seconds)
        return int(await self.client.zremrangebyscore(keys.monitor_history(tenant), "-inf", f"({cutoff}"))

    async def count(self, tenant: str) -> int:
        return int(await self.client.zcard(keys.monitor_history(tenant)))

    async def search(
        self,
        tenant: str,
        text: str = "",
        stream: str = "",
        since: float | None = None,
        until: float | None = None,
        kinds: Sequence[str] = (),
        limit: int = 100,
        before: str | None = None,
    ) -> HistoryPage:
        """Entries of ``tenant`` newest first whose text holds every whitespace-separated term of
        ``text`` (case-insensitive), of ``stream`` ("" = any), with wall time in [since, until]
        (unix s) and kind in ``kinds`` (() = any). ``before``: a cursor from a previous page."""
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit must be within [1, {MAX_LIMIT}], got {limit}.")
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise InvalidArgument(f"kinds must be among {', '.join(KINDS)}, got {sorted(unknown)}.")
        terms = text.casefold().split()
        key = keys.monitor_history(tenant)
        low = "-inf" if since is None else str(_ms(since))
        top: int | None = None if until is None else _ms(until)
        seen = 0  # members of score `top` already passed
        if before:  # a cursor of the same search: at or below `until` already
            top, seen = _parse_cursor(before)
        found: list[HistoryEntry] = []
        scanned = 0
        while scanned < self.scan_max:
            page = min(PAGE, self.scan_max - scanned)
            rows = await self.client.zrevrangebyscore(
                key, "+inf" if top is None else top, low, start=seen, num=page, withscores=True
            )
            for member, score in rows:
                scanned += 1
                score = int(score)
                seen = seen + 1 if score == top else 1
                top = score
                entry = HistoryEntry.from_member(tenant, member, score)
                if self._wanted(entry, terms, stream, kinds):
                    found.append(entry)
                    if len(found) == limit:
                        return HistoryPage(found, _cursor(top, seen))
            if len(rows) < page:
                return HistoryPage(found, "")
        assert top is not None  # scan_max > 0, so the loop read something
        return HistoryPage(found, _cursor(top, seen))

    @staticmethod
    def _wanted(entry: HistoryEntry, terms: list[str], stream: str, kinds: Sequence[str]) -> bool:
        if (stream and entry.stream != stream) or (kinds and entry.kind not in kinds):
            return False
        folded = entry.text.casefold()
        return all(t in folded for t in terms)


def _cue_text(e: HistoryEntry) -> str:
    if e.kind == ANSWER:
        return f"{e.question_id}: {e.text}"
    if e.kind == ALERT:
        return f"ALERT {e.rule_id}: {e.text}"
    return e.text


def to_webvtt(entries: Iterable[HistoryEntry]) -> str:
    """WebVTT of one stream's entries in stream time (answers prefixed by their question id,
    alerts by ``ALERT <rule>``)."""
    items = sorted(entries, key=lambda e: (e.window_start, e.window_end))
    streams = sorted({e.stream for e in items})
    if len(streams) > 1:
        raise InvalidArgument(
            f"a WebVTT file holds one stream's entries; got {len(streams)}: {', '.join(streams[:5])}."
        )
    return render_webvtt(TimedCaption(e.window_start, e.window_end, _cue_text(e)) for e in items)


def to_json(entries: Iterable[HistoryEntry]) -> str:
    """A JSON array of the entries, in the order given."""
    return json.dumps([e.to_dict() for e in entries], ensure_ascii=False)
