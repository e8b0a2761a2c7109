"""Monitoring at the gateway: rules over the live sessions whose audio this gateway takes.

:class:`LiveMonitor` follows each such session's event stream (through the gateway's
:class:`~services.gateway.hub.EventHub`) and keeps the last ``ring_seconds`` of its audio. For every
caption and answer it evaluates the tenant's rules (:mod:`services.monitor.rules`); final ones go
to the tenant's history. An alert is written once (a claim key makes a firing replayed after a
failover a no-op): its audio clip, the tenant's alert stream, the history, an ``AlertEvent`` in the
session's own event stream (so clients see it in order, and a resume replays it) and, when the rule
has one, a signed webhook (queued, never blocking). The audio level feeds silence rules.

It runs on its own thread with an asyncio loop and Redis client: nothing here is on the audio or
caption path. Rules are re-read when the tenant's rule version changes (checked every
``RULES_REFRESH_S``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.constants import SAMPLE_RATE
from services.gateway.hub import EventHub, Subscription
from services.monitor.clips import AudioRing, ClipStore
from services.monitor.history import ALERT, ANSWER, CAPTION, HistoryEntry, HistoryStore
from services.monitor.limits import MonitorLimits
from services.monitor.rules import NO_AUDIO, Alert, Observation, Rule, RuleStore, StreamRules
from services.monitor.webhook import WebhookLimits, WebhookSender
from services.transport import keys
from services.transport.connect import connect_async
from services.transport.streams import entry_time
from services.wire.events import AlertEvent, CaptionEvent, EndEvent

log = logging.getLogger(__name__)
TICK_S = 0.25  # how often events and audio levels are looked at
RULES_REFRESH_S = 2.0  # how often each tenant's rule version is checked
NO_AUDIO_AFTER_S = 1.0  # wall time without audio before a span counts as "no audio"
LEVELS_EVERY_S = 1.0  # how often the sessions' audio levels are published (monitoring view)
LEVEL_SPAN_S = 1.0  # the level published is of the newest this many seconds
LEVELS_TTL_S = 60  # a tenant's levels hash outlives its last update by this long
ALERTS_MAXLEN = 10_000  # alerts kept per tenant stream
FIRED_TTL_S = 86_400  # how long a firing's claim is kept


@dataclass
class _Tracked:
    """One session under watch."""

    sid: str
    tenant: str
    sub: Subscription
    ring: AudioRing | None  # None: the stream time of its audio is unknown here (resumed from elsewhere)
    rules: StreamRules
    lock: threading.Lock = field(default_factory=threading.Lock)  # the ring (fed by gateway threads)
    last_audio: float = field(default_factory=time.monotonic)
    level_time: float = 0.0  # stream s the levels are observed up to
    ended: bool = False


class LiveMonitor:
    def __init__(
        self,
        redis_url: str,
        hub: EventHub,
        captions_maxlen: int,
        limits: MonitorLimits | None = None,
        webhooks: WebhookLimits | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis_url = redis_url
        self.hub = hub
        self.captions_maxlen = captions_maxlen
        self.limits = limits or MonitorLimits()
        self.webhook_limits = webhooks or WebhookLimits()
        self.wall_clock = wall_clock
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._rules: dict[str, tuple[int, list[Rule]]] = {}  # tenant -> (version, rules)
        self._checked: dict[str, float] = {}  # tenant -> when its version was last read
        self.fired = 0  # alerts written (for tests and metrics)
        self._levels_at = 0.0
        self._gone: list[tuple[str, str]] = []  # untracked sessions whose level is to be removed
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    # --- called from the gateway's threads ------------------------------------------------------

    def track(self, sid: str, tenant: str, cursor: str = "0-0", stream_time: float | None = 0.0) -> None:
        """Watch a session from event ``cursor`` on; its audio ring starts at ``stream_time`` (None:
        unknown, as for a session resumed from another gateway: its alerts then have no clip and
        silence rules wait for a known stream time)."""
        with self._lock:
            if sid in self._tracked:
                return
            sub = self.hub.subscribe(sid, cursor, self._wake)
            start = stream_time or 0.0
            ring = None if stream_time is None else AudioRing(self.limits.ring_seconds, SAMPLE_RATE, start)
            rules = StreamRules(sid, tenant, self._rules.get(tenant, (0, []))[1], start, self.wall_clock)
            self._tracked[sid] = _Tracked(sid, tenant, sub, ring, rules, level_time=start)
        self._wake.set()

    def audio(self, sid: str, samples: np.ndarray) -> None:
        """16 kHz mono samples the session just took (from its feed)."""
        t = self._tracked.get(sid)
        if t is None or t.ring is None:
            return
        with t.lock:
            t.ring.extend(samples)
        t.last_audio = time.monotonic()

    def untrack(self, sid: str) -> None:
        with self._lock:
            t = self._tracked.pop(sid, None)
        if t is not None:
            self.hub.unsubscribe(t.sub)
            self._gone.append((t.tenant, sid))

    def tracking(self, sid: str) -> bool:
        return sid in self._tracked

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=15)
        for sid in list(self._tracked):
            self.untrack(sid)

    # --- the monitor thread ---------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        client = connect_async(self.redis_url, socket_timeout=10.0)
        self.redis = client
        self.store = RuleStore(client, self.limits)
        self.clips = ClipStore(client, self.limits)
        self.history = HistoryStore(client, self.limits)
        self.webhooks = WebhookSender(client, self.store, self.webhook_limits)
        self._ready.set()
        try:
            while not self._stop.is_set():
                await asyncio.to_thread(self._wake.wait, TICK_S)
                self._wake.clear()
                try:
                    await self._round()
                except Exception:  # Redis away, a bad rule...: log, keep watching
                    log.exception("monitoring round failed")
                    await asyncio.sleep(TICK_S)
        finally:
            await self.webhooks.close()
            await client.aclose()

    async def _round(self) -> None:
        with self._lock:
            tracked = list(self._tracked.values())
        await self._refresh_rules({t.tenant for t in tracked})
        await self._publish_levels(tracked)
        for t in tracked:
            alerts: list[tuple[Alert, Rule | None]] = []
            history: list[HistoryEntry] = []
            for ev in t.sub.take():
                if isinstance(ev, CaptionEvent):
                    alerts += self._with_rules(t, t.rules.observe(Observation.from_caption(ev)))
                    if ev.is_final:
                        history.append(_entry(t.tenant, t.sid, ev))
                elif isinstance(ev, EndEvent):
                    t.ended = True
            alerts += self._with_rules(t, self._levels(t))
            if history:
                await self.history.add(history)
            for alert, rule in alerts:
                await self._fire(t, alert, rule)
            if t.ended:
                self.untrack(t.sid)

    def _levels(self, t: _Tracked) -> list[Alert]:
        """Silence rules: the level of the audio since the last round, or "no audio" when none came
        for a while (stream time then advances with the wall clock)."""
        if t.ended or t.ring is None or not any(r.kind == "silence" for r in t.rules.rules):
            return []
        with t.lock:
            end = t.ring.end_time
            if end > t.level_time:
                dbfs = t.ring.level_dbfs(end - t.level_time)
                t.level_time = end
                return t.rules.observe_level(end, dbfs)
        quiet = time.monotonic() - t.last_audio
        if quiet < NO_AUDIO_AFTER_S:
            return []
        t.level_time = max(t.level_time, end + quiet)
        return t.rules.observe_level(t.level_time, NO_AUDIO)

    async def _publish_levels(self, tracked: list[_Tracked]) -> None:
        """Each session's current level (dBFS of its newest second) for the monitoring view."""
        now = time.monotonic()
        if now - self._levels_at < LEVELS_EVERY_S:
            return
        self._levels_at = now
        by_tenant: dict[str, dict[str, str]] = {}
        wall = self.wall_clock()
        for t in tracked:
            if t.ring is None or t.ended:
                continue
            with t.lock:
                dbfs = t.ring.level_dbfs(LEVEL_SPAN_S) if now - t.last_audio < NO_AUDIO_AFTER_S else NO_AUDIO
            level = "-inf" if dbfs == NO_AUDIO else f"{dbfs:.1f}"
            by_tenant.setdefault(t.tenant, {})[t.sid] = f"{level} {wall:.0f}"
        gone, self._gone = self._gone, []
        for tenant, sid in gone:
            await self.redis.hdel(keys.monitor_levels(tenant), sid)
        for tenant, levels in by_tenant.items():
            key = keys.monitor_levels(tenant)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping=levels)
            pipe.expire(key, LEVELS_TTL_S)
            await pipe.execute()

    def _with_rules(self, t: _Tracked, alerts: list[Alert]) -> list[tuple[Alert, Rule | None]]:
        by_id = {r.rule_id: r for r in t.rules.rules}
        return [(a, by_id.get(a.rule_id)) for a in alerts]

    async def _refresh_rules(self, tenants: set[str]) -> None:
        now = time.monotonic()
        for tenant in tenants:
            if now - self._checked.get(tenant, -RULES_REFRESH_S) < RULES_REFRESH_S:
                continue
            self._checked[tenant] = now
            version = await self.store.version(tenant)
            if tenant in self._rules and self._rules[tenant][0] == version:
                continue
            rules = await self.store.list(tenant)
            self._rules[tenant] = (version, rules)
            with self._lock:
                mine = [t for t in self._tracked.values() if t.tenant == tenant]
            for t in mine:
                t.rules.replace_rules(rules)
        for gone in set(self._rules) - tenants:
            self._rules.pop(gone, None)
            self._checked.pop(gone, None)

    def refresh_now(self) -> None:
        """Re-read every tenant's rules at the next round (the API calls it after a change)."""
        self._checked.clear()
        self._wake.set()

    async def _fire(self, t: _Tracked, alert: Alert, rule: Rule | None) -> None:
        what = f"{t.sid}|{alert.rule_id}|{alert.event_id or f'{alert.window_end:.3f}'}"
        claim = keys.monitor_alert_once(t.tenant, hashlib.sha256(what.encode()).hexdigest()[:32])
        if not await self.redis.set(claim, alert.alert_id, nx=True, ex=FIRED_TTL_S):
            return  # fired already (this stream's events replayed after a failover)
        start = max(alert.window_start, alert.window_end - self.limits.max_clip_seconds)
        with t.lock:
            clip = t.ring.slice(start, alert.window_end) if t.ring is not None else None
        has_clip = clip is not None and clip.size > 0
        if has_clip:
            assert clip is not None
            await self.clips.put(t.tenant, alert.alert_id, clip, SAMPLE_RATE)
        await self.redis.xadd(
            keys.monitor_alerts(t.tenant),
            {"alert": alert.to_json(), "has_clip": "1" if has_clip else "0"},
            maxlen=ALERTS_MAXLEN,
            approximate=True,
        )
        await self.history.add(
            [
                HistoryEntry(
                    ALERT,
                    t.tenant,
                    t.sid,
                    alert.alert_id,
                    alert.text,
                    alert.wall_time,
                    alert.window_start,
                    alert.window_end,
                    question_id=alert.question_id,
                    rule_id=alert.rule_id,
                )
            ]
        )
        event = AlertEvent(
            alert.alert_id,
            alert.rule_id,
            alert.kind,
            alert.text,
            alert.window_start,
            alert.window_end,
            alert.question_id,
            alert.wall_time,
            has_clip,
        )
        await self.redis.xadd(
            keys.session_captions(t.sid), event.to_fields(), maxlen=self.captions_maxlen, approximate=True
        )
        if rule is not None and rule.webhook_url:
            await self.webhooks.submit(alert, rule.webhook_url)
        self.fired += 1
        log.info(
            "alert %s: rule %s fired on session %s: %s", alert.alert_id, alert.rule_id, t.sid, alert.text
        )

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the monitor's loop from another thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


def _entry(tenant: str, sid: str, ev: CaptionEvent) -> HistoryEntry:
    return HistoryEntry(
        ANSWER if ev.question_id else CAPTION,
        tenant,
        sid,
        ev.event_id,
        ev.text,
        entry_time(ev.event_id),  # when it was made: the same on every replay
        ev.window_start,
        ev.window_end,
        question_id=ev.question_id,
        answer=ev.answer,
        segment_id=ev.segment_id,
    )
