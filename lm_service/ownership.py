"""Which live sessions an LM worker owns: leases, adoption (new sessions and takeovers), letting go.

A worker owns a session while it holds the session's lease (``SET NX PX``, renewed by a
heartbeat). It adopts every active session without a lease, up to ``max_sessions``; on adoption
it rebuilds the session's caption schedule from Redis (settings, counters, and the publications
an earlier owner already applied). It lets a session go when the session ends, when its lease
is taken over, when the gateway abandoned it, or when it got no publication for
``silent_session_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from lm_service.engines.base import CaptionEngine
from lm_service.reader import PublicationReader
from lm_service.schedule import CaptionSchedule, ScheduleState
from services import metrics
from services.errors import InvalidArgument, MidashengError, NotFound
from services.transport import keys
from services.transport.keys import TransportDefaults
from services.transport.lease import Heartbeat, Lease
from services.wire.events import CaptionStream
from services.wire.load import LoadReport
from services.wire.settings import QUESTIONS_FIELD, questions_from_text, settings_from_hash

log = logging.getLogger(__name__)
PENDING_REPORT_S = 5.0  # the pending-entries gauge is refreshed this often (one XPENDING per session)


@dataclass
class OwnedSession:
    sid: str
    schedule: CaptionSchedule
    stream: str  # its token stream
    failures: dict[str, int] = field(default_factory=dict)  # entry id -> failed captioning attempts
    gap_since: float | None = None  # when a publication arrived ahead of a missing seq
    last_publication: float = field(default_factory=time.monotonic)
    config_refreshed: float = 0.0  # when its config's TTL was last renewed (monotonic)
    allow_gap: bool = False  # a poison entry was dead-lettered: the next seq gap is expected
    questions_text: bytes = b""  # its config's questions field as last read (changed live by gateways)
    # Applied publications a replay could start from (entry id, token_start), oldest first.
    cut_points: list[tuple[str, int]] = field(default_factory=list)


class SessionOwnership:
    def __init__(
        self,
        client: redis.Redis,
        engine: CaptionEngine,
        reader: PublicationReader,
        captions: CaptionStream,
        worker_id: str,
        defaults: TransportDefaults,
        max_sessions: int,
        silent_session_s: float,
        on_release: Callable[[str], None] = lambda sid: None,
        max_lag_s: float = 5.0,
    ) -> None:
        self.redis = client
        self.engine = engine
        self.reader = reader
        self.captions = captions
        self.worker_id = worker_id
        self.defaults = defaults
        self.max_sessions = max_sessions
        self.silent_session_s = silent_session_s  # longer than any gateway idle/resume timeout
        self.on_release = on_release  # the worker drops in-flight work of a session let go
        self.lease = Lease(client)
        self.sessions: dict[str, OwnedSession] = {}
        self._lost: set[str] = set()
        self._lost_lock = threading.Lock()
        self.heartbeat = Heartbeat(
            self.lease,
            worker_id,
            ttl_ms=defaults.lease_ttl_ms,
            heartbeat_ms=defaults.heartbeat_ms,
            on_lost=self.on_lost,
        )
        self._last_scan = 0.0
        self._last_pending_report = 0.0
        self.max_lag_s = max_lag_s
        self._lag_s = 0.0  # the oldest publication admitted since the last report, seconds
        self.behind = False  # publications wait longer than max_lag_s: adopt nothing new

    def housekeeping(self, now: float) -> None:
        """Drop lost leases every call; adopt, drop abandoned and silent sessions every half heartbeat."""
        self.drop_lost()
        if now - self._last_scan < self.defaults.heartbeat_ms / 1000 / 2:
            return
        self._last_scan = now
        self.behind, self._lag_s = self._lag_s > self.max_lag_s, 0.0
        self.report()
        if not self.behind:
            self.adopt_free_sessions()
        self.drop_abandoned()
        self.refresh_questions()
        if now - self._last_pending_report >= PENDING_REPORT_S:
            self._last_pending_report = now
            self.report_pending()
        self.expire_silent(now)

    # --- load -----------------------------------------------------------------------------------

    def observe_lag(self, seconds: float) -> None:
        self._lag_s = max(self._lag_s, seconds)

    def report(self) -> None:
        """Publish this worker's load for gateways deciding whether to take new streams."""
        report = LoadReport(len(self.sessions), self.max_sessions, self.behind, time.time())
        self.redis.hset(keys.LM_WORKERS, self.worker_id, report.to_text())

    def withdraw_report(self) -> None:
        self.redis.hdel(keys.LM_WORKERS, self.worker_id)

    # --- leases ---------------------------------------------------------------------------------

    def on_lost(self, key: str) -> None:
        with self._lost_lock:
            self._lost.add(key)

    def drop_lost(self) -> None:
        with self._lost_lock:
            lost, self._lost = self._lost, set()
        for sid in [s for s in self.sessions if keys.session_lease(s) in lost]:
            log.warning("lease of session %s was taken over; dropping it", sid)
            self.heartbeat.discard(keys.session_lease(sid))
            self._forget(sid)

    # --- adoption -------------------------------------------------------------------------------

    def adopt_free_sessions(self) -> list[str]:
        """Take the lease of every active session that has none (new, or its worker died)."""
        adopted = []
        for raw in self.redis.zrange(keys.ACTIVE_SESSIONS, 0, -1):
            sid = raw.decode()
            if sid in self.sessions or len(self.sessions) >= self.max_sessions:
                continue
            lease_key = keys.session_lease(sid)
            if not self.lease.acquire(lease_key, self.worker_id, self.defaults.lease_ttl_ms):
                continue
            self.heartbeat.add(lease_key)  # before the (possibly slow) adoption, so the lease holds
            try:
                self._adopt(sid)
            except Exception as e:  # this session cannot be taken on; the others still are
                if isinstance(e, MidashengError):
                    log.error("cannot adopt session %s: %s", sid, e)
                    code = "NOT_FOUND" if isinstance(e, NotFound) else "INVALID_ARGUMENT"
                else:
                    log.exception("adopting session %s failed", sid)
                    code = "INTERNAL"
                self.end_with_error(sid, f"the session cannot be captioned: {e}", code)
                self.heartbeat.discard(lease_key)
                self.lease.release(lease_key, self.worker_id)
                continue
            adopted.append(sid)
        metrics.LM_SESSIONS.set(len(self.sessions))
        return adopted

    def _adopt(self, sid: str) -> None:
        raw = self.redis.hgetall(keys.session_config(sid))
        if not raw:
            raise NotFound(f"session {sid} has no configuration (expired or never created)")
        settings = settings_from_hash(raw).session
        if settings.adapter:
            self.engine.check_adapter(settings.adapter)  # NotFound ends the session with a clear error
        schedule = CaptionSchedule(
            settings, ScheduleState.from_hash(self.redis.hgetall(keys.session_state(sid)))
        )
        session = OwnedSession(sid, schedule, keys.session_tokens(sid))
        session.questions_text = raw.get(QUESTIONS_FIELD.encode(), b"")
        self.reader.ensure_group(session)
        if schedule.last_seq:  # an earlier owner applied publications: rebuild the token buffer
            self.reader.replay_applied(session)
            log.info("took over session %s at seq %d", sid, schedule.last_seq)
            metrics.LEASE_TAKEOVERS.inc()
        self.reader.claim_pending(session)  # a dead owner's pending publications become ours
        self.sessions[sid] = session

    def refresh_questions(self) -> None:
        """Pick up questions a gateway changed (``SetQuestions``): one round trip for every session;
        they apply from the session's next publication on."""
        sids = list(self.sessions)
        if not sids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(keys.session_config(sid), QUESTIONS_FIELD)
        for sid, raw in zip(sids, pipe.execute(), strict=True):
            session = self.sessions.get(sid)
            if session is None or raw is None or raw == session.questions_text:
                continue
            session.questions_text = raw
            try:
                questions = questions_from_text(raw)
            except InvalidArgument as e:  # the gateway validates; keep the old ones if not
                log.warning("session %s: ignoring malformed questions: %s", sid, e)
                continue
            sched = session.schedule
            sched.settings = dataclasses.replace(sched.settings, questions=questions)

    # --- letting go -----------------------------------------------------------------------------

    def drop_abandoned(self) -> None:
        """Let go of owned sessions that left the active set without this worker ending them: the
        gateway abandoned them (their encoder state is gone) and already wrote their end."""
        sids = list(self.sessions)
        if not sids:
            return
        scores = self.redis.zmscore(keys.ACTIVE_SESSIONS, sids)  # one command for every session
        for sid, score in zip(sids, scores, strict=True):
            if score is None and sid in self.sessions:
                log.info("session %s left the active set (abandoned by its gateway); letting it go", sid)
                self.let_go(sid)

    def expire_silent(self, now: float) -> None:
        """End sessions that got no publication for ``silent_session_s`` (their encoder or gateway is gone)."""
        for session in [
            s for s in self.sessions.values() if now - s.last_publication > self.silent_session_s
        ]:
            log.warning(
                "session %s got no audio tokens for %.0f s; ending it", session.sid, self.silent_session_s
            )
            self.captions.end_with_error(
                session.sid,
                f"no audio tokens arrived for {self.silent_session_s:.0f} s; the session was ended",
                "UNAVAILABLE",
                "NO_AUDIO_TOKENS",
            )
            self.finish(session)

    def report_pending(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for s in self.sessions.values():
            pipe.xpending(s.stream, self.reader.group)
        total = sum(int(r["pending"]) for r in pipe.execute() if isinstance(r, dict))
        metrics.PENDING.labels(stream="tokens").set(total)

    def end_with_error(self, sid: str, message: str, code: str = "INTERNAL") -> None:
        """Tell the client (fatal error event + end) and drop the session from the active set."""
        self.captions.end_with_error(sid, message, code, code)
        self.redis.zrem(keys.ACTIVE_SESSIONS, sid)

    def finish(self, session: OwnedSession) -> None:
        """The session ended: leave the active set; its token stream (the bulk of its bytes,
        needed by no one once the last caption is out) goes at once, its other keys expire after
        ``session_ttl_s`` (the caption stream stays readable for downloads and late resumes)."""
        pipe = self.redis.pipeline(transaction=False)  # the active set and the session: two slots
        pipe.zrem(keys.ACTIVE_SESSIONS, session.sid)
        tokens, lease = keys.session_tokens(session.sid), keys.session_lease(session.sid)
        pipe.delete(tokens)
        for key in keys.session_keys(session.sid):
            if key not in (tokens, lease):
                pipe.expire(key, self.defaults.session_ttl_s)
        pipe.execute()
        self.let_go(session.sid)

    def let_go(self, sid: str) -> None:
        """Stop owning a session: no more heartbeat, lease released, forgotten here."""
        lease_key = keys.session_lease(sid)
        self.heartbeat.discard(lease_key)
        self.lease.release(lease_key, self.worker_id)
        self._forget(sid)

    def _forget(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is not None:
            self.on_release(sid)
            self.engine.end_stream(sid)
        metrics.LM_SESSIONS.set(len(self.sessions))
