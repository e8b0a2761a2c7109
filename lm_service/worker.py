"""LM worker: leases live sessions from Redis and turns their audio tokens into caption events.

One ``step()``: adopt sessions whose lease is free -> read the next publication of every owned
session -> plan due captions -> run the engine once for all of them -> apply each session's
events atomically with its ``last_seq`` and the ack (``apply_once``).

Takeover: a session whose worker died keeps its token stream and state hash in Redis. The next
worker to take its lease claims the pending publications, rebuilds the token buffer by replaying
the retained publications it had already applied (``seq <= last_seq``), and carries on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from lm_service.engine import CaptionEngine, CaptionRequest
from lm_service.session import CaptionSchedule, PlannedCaption
from services import metrics
from services.errors import InvalidArgument, MidashengError, NotFound
from services.model.generation import GenerationOptions
from services.streaming.codec import PAYLOAD_FIELD, TokenMessage, decode_tokens
from services.streaming.settings import settings_from_hash
from services.transport import keys
from services.transport.apply import apply_once
from services.transport.keys import TransportDefaults
from services.transport.lease import Heartbeat, Lease
from services.transport.streams import Entry, StreamClient

log = logging.getLogger(__name__)
GROUP = "lm"


@dataclass
class OwnedSession:
    sid: str
    schedule: CaptionSchedule
    stream: str
    failures: dict[str, int] = field(default_factory=dict)
    gap_since: float | None = None  # when a publication arrived ahead of a missing seq
    last_publication: float = field(default_factory=time.monotonic)
    allow_gap: bool = False  # a poison entry was dead-lettered: the next seq gap is expected


@dataclass
class _Work:
    session: OwnedSession
    entry: Entry
    msg: TokenMessage
    plans: list[PlannedCaption]
    texts: list[str] = field(default_factory=list)


class LMWorker:
    def __init__(
        self,
        client: redis.Redis,
        engine: CaptionEngine,
        worker_id: str | None = None,
        defaults: TransportDefaults | None = None,
        max_sessions: int = 64,
        silent_session_s: float = 600.0,
    ) -> None:
        self.redis = client
        self.streams = StreamClient(client)
        self.engine = engine
        self.worker_id = worker_id or f"lm-{uuid.uuid4().hex[:8]}"
        self.defaults = defaults or TransportDefaults()
        self.max_sessions = max_sessions
        self.silent_session_s = silent_session_s  # longer than any gateway idle/resume timeout
        self.lease = Lease(client)
        self.sessions: dict[str, OwnedSession] = {}
        self._lost: set[str] = set()
        self._lost_lock = threading.Lock()
        self.heartbeat = Heartbeat(
            self.lease,
            self.worker_id,
            ttl_ms=self.defaults.lease_ttl_ms,
            heartbeat_ms=self.defaults.heartbeat_ms,
            on_lost=self._on_lost,
        )
        self._last_scan = 0.0

    # --- leases ----------------------------------------------------------------------------------

    def _on_lost(self, key: str) -> None:
        with self._lost_lock:
            self._lost.add(key)

    def _drop_lost(self) -> None:
        with self._lost_lock:
            lost, self._lost = self._lost, set()
        for sid in [s for s in self.sessions if keys.session_lease(s) in lost]:
            log.warning("lease of session %s was taken over; dropping it", sid)
            self.heartbeat.discard(keys.session_lease(sid))
            self.sessions.pop(sid, None)
            metrics.LM_SESSIONS.set(len(self.sessions))

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
                self._end_with_error(sid, f"the session cannot be captioned: {e}", code)
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
        settings = settings_from_hash(raw)
        if settings.adapter:
            self.engine.check_adapter(settings.adapter)  # NotFound ends the session with a clear error
        schedule = CaptionSchedule(settings)
        state = {
            k.decode(): int(float(v))
            for k, v in self.redis.hgetall(keys.session_state(sid)).items()
            if k.decode() in ("segments_final", "open_revision", "last_seq")
        }
        schedule.restore(state)
        stream = keys.session_tokens(sid)
        self.streams.ensure_group(stream, GROUP, start="0")
        # Rebuild the token buffer from publications already applied by an earlier owner.
        if schedule.last_seq:
            for _entry_id, fields in self.redis.xrange(stream, "-", "+"):
                try:
                    _, msg = decode_tokens(fields[PAYLOAD_FIELD.encode()])
                except (InvalidArgument, KeyError):
                    continue
                if msg.seq <= schedule.last_seq:
                    schedule.ingest(msg)
            log.info("took over session %s at seq %d", sid, schedule.last_seq)
        session = OwnedSession(sid, schedule, stream)
        self._claim_pending(session)  # a dead owner's pending publications become ours (we hold the lease)
        self.sessions[sid] = session

    def _drop_abandoned(self) -> None:
        """Let go of owned sessions that left the active set without this worker ending them: the
        gateway abandoned them (their encoder state is gone) and already wrote their end."""
        sids = list(self.sessions)
        if not sids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.zscore(keys.ACTIVE_SESSIONS, sid)
        for sid, score in zip(sids, pipe.execute(), strict=True):
            if score is None and sid in self.sessions:
                log.info("session %s left the active set (abandoned by its gateway); letting it go", sid)
                self._let_go(sid)

    def _expire_silent(self, now: float) -> None:
        """End sessions that got no publication for ``silent_session_s`` (their encoder or gateway is gone)."""
        for session in [
            s for s in self.sessions.values() if now - s.last_publication > self.silent_session_s
        ]:
            log.warning(
                "session %s got no audio tokens for %.0f s; ending it", session.sid, self.silent_session_s
            )
            self.streams.end_with_error(
                session.sid,
                f"no audio tokens arrived for {self.silent_session_s:.0f} s; the session was ended",
                "UNAVAILABLE",
                "NO_AUDIO_TOKENS",
                self.defaults.captions_maxlen,
            )
            self._finish(session)

    def _report_pending(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for s in self.sessions.values():
            pipe.xpending(s.stream, GROUP)
        total = sum(int(r["pending"]) for r in pipe.execute() if isinstance(r, dict))
        metrics.PENDING.labels(stream="tokens").set(total)

    def _end_with_error(self, sid: str, message: str, code: str = "INTERNAL") -> None:
        """Tell the client (fatal error event + end) and drop the session from the active set."""
        self.streams.end_with_error(sid, message, code, code, self.defaults.captions_maxlen)
        self.redis.zrem(keys.ACTIVE_SESSIONS, sid)

    # --- the loop --------------------------------------------------------------------------------

    def step(self, block_ms: int | None = None) -> int:
        """One scheduling round; returns how many publications were handled."""
        self._drop_lost()
        now = time.monotonic()
        if now - self._last_scan >= self.defaults.heartbeat_ms / 1000 / 2:
            self._last_scan = now
            self.adopt_free_sessions()
            self._drop_abandoned()
            self._report_pending()
            self._expire_silent(now)
        if not self.sessions:
            time.sleep((block_ms or self.defaults.block_ms) / 1000)
            return 0
        # Own pending entries first (after a takeover or a failed step), then new ones for the
        # sessions with nothing pending, so one stuck session does not hold up the others.
        entries = self.streams.read_group(
            GROUP, self.worker_id, {s.stream: "0" for s in self.sessions.values()}, count=1, block_ms=None
        )
        busy = {e.stream for e in entries}
        fresh = {s.stream: ">" for s in self.sessions.values() if s.stream not in busy}
        if fresh:
            entries += self.streams.read_group(
                GROUP,
                self.worker_id,
                fresh,
                count=1,
                block_ms=None if entries else block_ms or self.defaults.block_ms,
            )
        by_stream = {s.stream: s for s in self.sessions.values()}
        work: list[_Work] = []
        for entry in entries:
            session = by_stream.get(entry.stream)
            if session is None:
                continue
            item = self._prepare(session, entry)
            if item is not None:
                work.append(item)
        if work:
            try:
                self._caption(work)
                done = list(work)
            except Exception:  # find the culprit: caption each session's windows on its own
                done = []
                for item in work:
                    try:
                        self._caption([item])
                        done.append(item)
                    except Exception as e:  # left pending and retried; dead-lettered after max_deliveries
                        self._failed(item, e)
            for item in done:
                item.session.failures.pop(item.entry.id, None)
                self._apply(item)
        elif entries and any(s.gap_since for s in self.sessions.values()):
            time.sleep(0.02)  # waiting for a claimed publication: do not spin
        return len(entries)

    def _prepare(self, session: OwnedSession, entry: Entry) -> _Work | None:
        try:
            if PAYLOAD_FIELD not in entry.fields:
                raise InvalidArgument(
                    f"stream entry has no {PAYLOAD_FIELD!r} field (fields: {sorted(entry.fields)})"
                )
            sid, msg = decode_tokens(entry.fields[PAYLOAD_FIELD])
            if sid != session.sid:
                raise InvalidArgument(
                    f"publication for session {sid!r} found in the stream of {session.sid!r}"
                )
        except InvalidArgument as e:
            self._poison(session, entry, str(e))
            return None
        sched = session.schedule
        if msg.seq <= sched.last_seq:
            self.streams.ack(entry.stream, GROUP, entry.id)  # already applied (redelivery)
            metrics.LM_DUPLICATES.inc()
            return None
        if msg.seq > sched.last_seq + 1 and not session.allow_gap:
            # An earlier publication is pending under another consumer (a stale owner read it just
            # before losing the lease): claim it and retry in order; give up on it after a lease TTL.
            now = time.monotonic()
            session.gap_since = session.gap_since or now
            if now - session.gap_since < self.defaults.lease_ttl_ms / 1000:
                self._claim_pending(session)
                return None  # stays pending under this worker; re-read in id order next step
            log.error(
                "session %s: publications %d..%d never arrived; continuing without them",
                session.sid,
                sched.last_seq + 1,
                msg.seq - 1,
            )
        session.gap_since, session.allow_gap = None, False
        try:
            sched.ingest(msg)
            plans = sched.plan(msg, commit=False)  # counters advance only once the events are durable
            for p in plans:
                sched.window(p.start_token, p.end_token)  # every planned window must be retained
        except Exception as e:  # a publication that does not fit this session: skip it, say so
            self._poison(session, entry, f"publication {msg.seq} does not fit the session: {e}", msg=msg)
            return None
        lag = max(0.0, time.time() - entry_time(entry.id))
        metrics.QUEUE_LAG.observe(lag)
        return _Work(session, entry, msg, plans)

    def _failed(self, item: _Work, exc: Exception) -> None:
        log.error(
            "captioning publication %s of session %s failed: %s",
            item.entry.id,
            item.session.sid,
            exc,
            exc_info=exc,
        )
        n = item.session.failures.get(item.entry.id, 0) + 1
        item.session.failures[item.entry.id] = n
        if n >= self.defaults.max_deliveries:
            item.session.failures.pop(item.entry.id, None)
            self._poison(
                item.session,
                item.entry,
                f"captioning failed {n} times: {type(exc).__name__}: {exc}",
                n,
                msg=item.msg,
            )

    def _claim_pending(self, session: OwnedSession) -> None:
        start = "0-0"
        while True:
            start, _, _ = self.streams.autoclaim(
                session.stream, GROUP, self.worker_id, 0, start=start, count=100
            )
            if start in ("0-0", "0"):
                return

    def _poison(
        self,
        session: OwnedSession,
        entry: Entry,
        reason: str,
        deliveries: int = 1,
        msg: TokenMessage | None = None,
    ) -> None:
        session.allow_gap = True
        log.error("dead-lettering publication %s of session %s: %s", entry.id, session.sid, reason)
        self.streams.dead_letter(entry.stream, GROUP, entry, reason, deliveries=deliveries)
        metrics.DEAD_LETTERS.inc()
        self.streams.add(
            keys.session_captions(session.sid),
            {
                "type": "error",
                "message": f"an audio-token publication could not be read and was skipped: {reason}",
                "fatal": "0",
                "reason": "PUBLICATION_SKIPPED",
            },
            self.defaults.captions_maxlen,
        )
        if msg is not None and msg.end_of_stream:  # the last one: the session still has to end
            self.streams.add(
                keys.session_captions(session.sid),
                {"type": "end", "reason": "error", "audio_seconds": f"{msg.stream_seconds:.3f}"},
                self.defaults.captions_maxlen,
            )
            self._finish(session)

    def _caption(self, work: Sequence[_Work]) -> None:
        requests: list[CaptionRequest] = []
        for item in work:
            s = item.session.schedule.settings
            opts = GenerationOptions(max_new_tokens=s.max_new_tokens)
            for p in item.plans:
                tokens = item.session.schedule.window(p.start_token, p.end_token)
                requests.append(CaptionRequest(tokens, s.prompt, opts, s.adapter))
        if not requests:
            return
        t0 = time.monotonic()
        texts = self.engine.caption(requests)
        metrics.CAPTION_SECONDS.observe(time.monotonic() - t0)
        k = 0
        for item in work:
            item.texts = texts[k : k + len(item.plans)]
            k += len(item.plans)

    def _apply(self, item: _Work) -> None:
        session, sched, msg = item.session, item.session.schedule, item.msg
        outputs: list[tuple[str, dict[str, str], int]] = []
        captions_key = keys.session_captions(session.sid)
        for plan, text in zip(item.plans, item.texts, strict=True):
            outputs.append(
                (
                    captions_key,
                    caption_fields(plan, text, msg.stream_seconds, sched.settings.adapter),
                    self.defaults.captions_maxlen,
                )
            )
        before = (sched.segments_final, sched.open_revision, sched.last_seq, sched.ended)
        sched.plan(msg, commit=True)  # the same plan as the preview: it is deterministic
        if msg.end_of_stream:
            outputs.append(
                (
                    captions_key,
                    {"type": "end", "reason": "end_of_stream", "audio_seconds": f"{msg.stream_seconds:.3f}"},
                    self.defaults.captions_maxlen,
                )
            )
        try:
            status, _ids = apply_once(
                self.redis,
                lease_key=keys.session_lease(session.sid),
                owner=self.worker_id,
                state_key=keys.session_state(session.sid),
                seq=msg.seq,
                ack_stream=item.entry.stream,
                group=GROUP,
                entry_id=item.entry.id,
                outputs=outputs,
                state_updates=sched.counters(),
                ttl_s=self.defaults.session_ttl_s,
            )
        except Exception:  # nothing or everything was written (one script): retry from the pending entry
            sched.segments_final, sched.open_revision, sched.last_seq, sched.ended = before
            raise
        session.last_publication = time.monotonic()
        self.redis.expire(
            keys.session_config(session.sid), self.defaults.session_ttl_s
        )  # live sessions keep it
        if status != "applied":  # lease lost, or another owner applied it first
            sched.segments_final, sched.open_revision, sched.last_seq, sched.ended = before
            self._on_lost(keys.session_lease(session.sid))
            return
        metrics.CAPTION_EVENTS.inc(len(item.plans))
        if msg.end_of_stream:
            self._finish(session)

    def _finish(self, session: OwnedSession) -> None:
        """The session ended: leave the active set; its keys expire after ``session_ttl_s`` (the
        caption stream stays readable for downloads and late resumes until then)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(keys.ACTIVE_SESSIONS, session.sid)
        for key in (
            keys.session_tokens(session.sid),
            keys.session_captions(session.sid),
            keys.session_state(session.sid),
            keys.session_config(session.sid),
        ):
            pipe.expire(key, self.defaults.session_ttl_s)
        pipe.execute()
        self._let_go(session.sid)

    def _let_go(self, sid: str) -> None:
        """Stop owning a session: no more heartbeat, lease released, forgotten here."""
        lease_key = keys.session_lease(sid)
        self.heartbeat.discard(lease_key)
        self.lease.release(lease_key, self.worker_id)
        self.sessions.pop(sid, None)
        metrics.LM_SESSIONS.set(len(self.sessions))

    def run(self, stop: threading.Event) -> None:
        self.heartbeat.start()
        try:
            while not stop.is_set():
                try:
                    self.step()
                except redis.RedisError as e:
                    log.error("redis error in the LM loop: %s; retrying", e)
                    stop.wait(0.5)
                except Exception:  # never let one bad step kill the worker; unacked work is retried
                    log.exception("unexpected error in the LM loop; retrying")
                    stop.wait(0.5)
        finally:
            self.heartbeat.stop(timeout=2.0)


def caption_fields(plan: PlannedCaption, text: str, stream_seconds: float, adapter: str) -> dict[str, str]:
    return {
        "type": "caption",
        "segment_id": str(plan.segment_id),
        "revision": str(plan.revision),
        "window_start": f"{plan.window_start_seconds:.3f}",
        "window_end": f"{plan.window_end_seconds:.3f}",
        "text": text,
        "is_final": "1" if plan.is_final else "0",
        "audio_seconds": f"{stream_seconds:.3f}",
        "adapter": adapter,
    }


def entry_time(entry_id: str) -> float:
    """Seconds since the epoch at which a stream entry was added (its id's millisecond part)."""
    return int(entry_id.split("-")[0]) / 1000.0
