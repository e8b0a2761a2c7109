"""LM worker: turns the audio tokens of the live sessions it owns into caption events.

One ``step()``: housekeeping of owned sessions (:mod:`lm_service.ownership`) -> collect finished
captions and apply each publication's events atomically with its ``last_seq`` and the ack
(``apply_once``) -> read the next publication of every session with nothing in flight
(:mod:`lm_service.reader`) -> plan its captions (:mod:`lm_service.schedule`) and submit them to
the engine (:mod:`lm_service.engines`), without waiting for them.

A session has at most one publication in flight, so its captions are applied in ``seq`` order;
different sessions' captions complete and are applied independently (a long caption of one
session does not hold up another's). A publication whose captioning fails stays pending and is
retried; after ``max_deliveries`` failures it is dead-lettered and the session goes on.

Takeover: a session whose worker died keeps its token stream and state hash in Redis. The next
worker to take its lease claims the pending publications, rebuilds the token buffer by replaying
the retained publications it had already applied (``seq <= last_seq``), and carries on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Annotated, ClassVar

import redis

from lm_service.engines.base import CaptionEngine, CaptionRequest, CaptionResult
from lm_service.ownership import OwnedSession, SessionOwnership
from lm_service.reader import GROUP, PublicationReader, Unfit
from lm_service.schedule import PlannedCaption, ScheduleState
from services import metrics
from services.errors import ConfigError
from services.model.generation import GenerationOptions
from services.monitor.answers import yes_no
from services.transport import keys
from services.transport.apply import ApplyStatus, apply_once
from services.transport.keys import TransportDefaults
from services.transport.streams import Entry, StreamClient, entry_time
from services.wire.events import CaptionEvent, CaptionStream, EndEvent, EndReason, ErrorEvent
from services.wire.settings import Question
from services.wire.tokens import TokenMessage

log = logging.getLogger(__name__)
__all__ = ["GROUP", "LMWorker", "WorkerLimits"]
CONFIG_REFRESH_S = 60.0  # how often a live session's config TTL is renewed (it is session_ttl_s long)
FUTURE_WAIT_S = 0.05  # longest wait for a caption while new publications may be arriving


@dataclass(frozen=True)
class WorkerLimits:
    """How much one LM worker loop takes on."""

    ENV_GROUP: ClassVar[str] = "LM"

    max_sessions: Annotated[int, "live sessions one worker loop leases at once"] = 64
    silent_session_s: Annotated[float, "s without an audio-token publication before a session is ended"] = (
        600.0
    )
    coalesce: Annotated[int, "publications of a session read at once; only the newest gets an interim"] = 16
    max_lag_seconds: Annotated[
        float,
        "s a publication may wait before this worker counts as behind (adopts nothing, gateways refuse new streams)",
    ] = 5.0

    def __post_init__(self) -> None:
        if (
            self.max_sessions < 1
            or self.silent_session_s <= 0
            or self.coalesce < 1
            or self.max_lag_seconds <= 0
        ):
            raise ConfigError("WorkerLimits: max_sessions and coalesce must be >= 1, silent_session_s > 0.")


@dataclass
class _Publication:
    entry: Entry
    msg: TokenMessage
    plans: list[PlannedCaption]
    state: ScheduleState  # the session's state once its captions are durable
    requests: int = 0  # how many of the work's futures are its captions and answers
    questions: tuple[Question, ...] = ()  # the session's questions when it was planned


@dataclass
class _Work:
    """A session's publications on their way through the engine (in seq order)."""

    session: OwnedSession
    publications: list[_Publication]
    futures: list[Future[CaptionResult]]

    @property
    def first(self) -> _Publication:
        return self.publications[0]


class LMWorker:
    def __init__(
        self,
        client: redis.Redis,
        engine: CaptionEngine,
        worker_id: str | None = None,
        defaults: TransportDefaults | None = None,
        limits: WorkerLimits | None = None,
    ) -> None:
        self.redis = client
        self.streams = StreamClient(client)
        self.engine = engine
        self.worker_id = worker_id or f"lm-{uuid.uuid4().hex[:8]}"
        self.defaults = defaults or TransportDefaults()
        self.limits = limits or WorkerLimits()
        self.captions = CaptionStream(self.streams, self.defaults.captions_maxlen)
        self.reader = PublicationReader(self.streams, self.worker_id, self.defaults)
        self.ownership = SessionOwnership(
            client,
            engine,
            self.reader,
            self.captions,
            self.worker_id,
            self.defaults,
            self.limits.max_sessions,
            self.limits.silent_session_s,
            on_release=self._release,
            max_lag_s=self.limits.max_lag_seconds,
        )
        self.in_flight: dict[str, _Work] = {}

    @property
    def sessions(self) -> dict[str, OwnedSession]:
        return self.ownership.sessions

    def adopt_free_sessions(self) -> list[str]:
        return self.ownership.adopt_free_sessions()

    # --- the loop --------------------------------------------------------------------------------

    def step(self, block_ms: int | None = None) -> int:
        """One round; returns how many publications were read or applied."""
        block = block_ms or self.defaults.block_ms
        self.ownership.housekeeping(time.monotonic())
        done = self._collect()
        if not self.sessions:
            time.sleep(block / 1000)
            return done
        idle = [s for s in self.sessions.values() if s.sid not in self.in_flight]
        busy = None if self.in_flight or done else block
        entries = self.reader.read(idle, busy, count=self.limits.coalesce) if idle else []
        by_stream = {s.stream: s for s in idle}
        grouped: dict[str, list[Entry]] = {}
        for entry in entries:  # read in id order per stream
            grouped.setdefault(entry.stream, []).append(entry)
        for stream, group in grouped.items():
            session = by_stream.get(stream)
            if session is not None:
                self._start(session, group)
        if not entries and self.in_flight:
            futures = [f for w in self.in_flight.values() for f in w.futures]
            wait(futures, timeout=min(block / 1000, FUTURE_WAIT_S), return_when=FIRST_COMPLETED)
        elif entries and not self.in_flight and any(s.gap_since for s in self.sessions.values()):
            time.sleep(0.02)  # waiting for a claimed publication: do not spin
        return done + len(entries)

    def run(self, stop: threading.Event) -> None:
        self.ownership.heartbeat.start()
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
            for work in self.in_flight.values():
                for f in work.futures:
                    f.cancel()
            self.release_all()
            self.ownership.heartbeat.stop(timeout=2.0)
            self.ownership.withdraw_report()

    def release_all(self) -> None:
        """Hand every owned session over now (on a clean stop, e.g. SIGTERM): its lease is released,
        so another worker's next adoption scan takes it within a second instead of after the lease
        TTL; unapplied publications stay pending for it."""
        for sid in list(self.sessions):
            try:
                self.ownership.let_go(sid)
            except redis.RedisError as e:  # taken over once the lease runs out instead
                log.warning("could not release session %s on stop: %s", sid, e)
        self.in_flight.clear()

    # --- one publication --------------------------------------------------------------------------

    def _start(self, session: OwnedSession, entries: list[Entry]) -> None:
        """Admit a session's next publications, plan their captions and submit them (or apply at
        once when none is due). When the LM is behind, several publications of a session arrive
        together: each gets its final captions, only the newest an interim (coalescing)."""
        sched = session.schedule
        admitted: list[tuple[Entry, TokenMessage]] = []
        last = sched.last_seq
        for entry in entries:
            try:
                msg = self.reader.admit(session, entry, last)
            except Unfit as e:
                self._poison(session, entry, str(e), msg=e.msg)
                continue
            if msg is None:
                if session.gap_since is not None:
                    break  # an earlier publication is missing: wait for it
                continue  # a duplicate (acked)
            try:
                sched.ingest(msg)
            except Exception as e:  # a publication that does not fit this session: skip it, say so
                self._poison(session, entry, f"publication {msg.seq} does not fit the session: {e}", msg=msg)
                continue
            admitted.append((entry, msg))
            last = msg.seq
            age = max(0.0, time.time() - entry_time(entry.id))
            metrics.QUEUE_LAG.observe(age)
            self.ownership.observe_lag(age)
        if not admitted:
            return
        work = _Work(session, [], [])
        requests: list[CaptionRequest] = []
        state = sched.state
        for i, (entry, msg) in enumerate(admitted):
            questions = sched.settings.questions
            try:
                plans, next_state = sched.plan(msg, state, interim=i == len(admitted) - 1)
                # every planned window must be retained; its caption first, then one answer per question
                mine = [r for p in plans for r in self._requests(session, p, questions)]
            except Exception as e:
                self._poison(session, entry, f"publication {msg.seq} does not fit the session: {e}", msg=msg)
                continue
            state = next_state
            requests += mine
            work.publications.append(_Publication(entry, msg, plans, next_state, len(mine), questions))
        if not work.publications:
            return
        if len(admitted) > 1:
            metrics.COALESCED.inc(len(admitted) - 1)
        if not requests:
            self._apply(work, [])
            return
        try:
            work.futures = self.engine.submit(requests)
        except Exception as e:  # refused as a whole: left pending and retried
            self._failed(work, e)
            return
        self.in_flight[session.sid] = work

    def _requests(
        self, session: OwnedSession, plan: PlannedCaption, questions: tuple[Question, ...]
    ) -> list[CaptionRequest]:
        """The window's caption and its answers: the same audio (and stream), so the engine computes
        the window's audio KV once and each answer only its question's tokens."""
        s = session.schedule.settings
        tokens = session.schedule.window(plan.start_token, plan.end_token)
        return [
            CaptionRequest(
                tokens,
                prompt,
                GenerationOptions(max_new_tokens=s.max_new_tokens),
                s.adapter,
                stream=session.sid,
                audio_start=plan.start_token,
                num_final=max(0, min(plan.end_token, session.schedule.n_final) - plan.start_token),
            )
            for prompt in (s.prompt, *(q.text for q in questions))
        ]

    def _collect(self) -> int:
        """Apply every publication whose captions are all done; returns how many were."""
        finished = [w for w in self.in_flight.values() if all(f.done() for f in w.futures)]
        for work in finished:
            del self.in_flight[work.session.sid]
        applied = 0
        for work in finished:
            if work.session.sid not in self.sessions:
                continue  # let go meanwhile
            try:
                results = [f.result() for f in work.futures]
            except Exception as e:  # left pending and retried; dead-lettered after max_deliveries
                self._failed(work, e)
                continue
            work.session.failures.pop(work.first.entry.id, None)
            self._apply(work, results)
            applied += 1
        return applied

    def _release(self, sid: str) -> None:
        """The session was let go: its captions in flight are no longer wanted."""
        work = self.in_flight.pop(sid, None)
        if work is not None:
            for f in work.futures:
                f.cancel()

    def _apply(self, work: _Work, results: list[CaptionResult]) -> None:
        """Write each publication's events with its ``last_seq`` and ack, in seq order."""
        session = work.session
        k = 0
        for pub in work.publications:
            mine = results[k : k + pub.requests]
            k += pub.requests
            if not self._apply_one(session, pub, mine):
                return

    def _apply_one(self, session: OwnedSession, pub: _Publication, results: list[CaptionResult]) -> bool:
        msg = pub.msg
        captions_key = keys.session_captions(session.sid)
        maxlen = self.defaults.captions_maxlen
        adapter = session.schedule.settings.adapter
        per_plan = 1 + len(pub.questions)
        outputs = []
        for i, plan in enumerate(pub.plans):
            caption, *answers = results[i * per_plan : (i + 1) * per_plan]
            for question, result in ((None, caption), *zip(pub.questions, answers, strict=True)):
                event = CaptionEvent(
                    segment_id=plan.segment_id,
                    revision=plan.revision,
                    window_start=plan.window_start_seconds,
                    window_end=plan.window_end_seconds,
                    text=result.text,
                    is_final=plan.is_final,
                    audio_seconds=msg.stream_seconds,
                    adapter=adapter,
                    question_id=question.id if question else "",
                    answer=yes_no(result.text) if question else None,
                )
                outputs.append((captions_key, event.to_fields(), maxlen))
        if msg.end_of_stream:
            outputs.append(
                (captions_key, EndEvent(EndReason.END_OF_STREAM, msg.stream_seconds).to_fields(), maxlen)
            )
        status, _ids = (
            apply_once(  # nothing or everything is written: on an error, retried from the pending entry
                self.redis,
                lease_key=keys.session_lease(session.sid),
                owner=self.worker_id,
                state_key=keys.session_state(session.sid),
                seq=msg.seq,
                ack_stream=pub.entry.stream,
                group=GROUP,
                entry_id=pub.entry.id,
                outputs=outputs,
                state_updates=pub.state.counters(),
                ttl_s=self.defaults.session_ttl_s,
            )
        )
        session.last_publication = now = time.monotonic()
        if now - session.config_refreshed > CONFIG_REFRESH_S:  # a live session keeps its config
            session.config_refreshed = now
            self.redis.expire(keys.session_config(session.sid), self.defaults.session_ttl_s)
        if status is not ApplyStatus.APPLIED:  # lease lost, or another owner applied it first
            self.ownership.on_lost(keys.session_lease(session.sid))
            return False
        session.schedule.state = pub.state
        metrics.CAPTION_EVENTS.inc(len(pub.plans))
        if msg.end_of_stream:
            self.ownership.finish(session)
            return False
        self.reader.trim_applied(session, pub.entry.id, msg)
        return True

    def _failed(self, work: _Work, exc: Exception) -> None:
        """Captioning failed: the publications stay pending and are read again; the first one is
        dead-lettered after ``max_deliveries`` failures."""
        session, pub = work.session, work.first
        log.error(
            "captioning publication %s of session %s failed: %s", pub.entry.id, session.sid, exc, exc_info=exc
        )
        n = session.failures.get(pub.entry.id, 0) + 1
        session.failures[pub.entry.id] = n
        if n >= self.defaults.max_deliveries:
            session.failures.pop(pub.entry.id, None)
            reason = f"captioning failed {n} times: {type(exc).__name__}: {exc}"
            self._poison(session, pub.entry, reason, n, msg=pub.msg)

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
        self.captions.append(
            session.sid,
            ErrorEvent(
                message=f"an audio-token publication could not be read and was skipped: {reason}",
                reason="PUBLICATION_SKIPPED",
                fatal=False,
            ),
        )
        if msg is not None and msg.end_of_stream:  # the last one: the session still has to end
            self.captions.append(session.sid, EndEvent(EndReason.ERROR, msg.stream_seconds))
            self.ownership.finish(session)
