"""Live caption sessions at the gateway: audio in (any rate, PCM) -> encoder; caption events out.

No gRPC here: the public API servicer and the WebRTC ingest both drive :class:`LiveSession`.
Sessions are registered in Redis (config hash + the active set the LM workers lease from); the
caption events an LM worker writes to the session's caption stream are read back by entry id,
which doubles as the resume cursor.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, ClassVar, Protocol

import numpy as np
import redis

from services import metrics
from services.audio.pcm import MAX_CHANNELS, MAX_RATE, MIN_RATE, PcmConverter
from services.constants import SAMPLE_RATE
from services.errors import (
    FailedPrecondition,
    InvalidArgument,
    MidashengError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.gateway.hub import EventHub, Subscription
from services.gateway.quotas import StreamQuotas
from services.principal import ANONYMOUS, Principal, may_read, may_resume, secret_hash
from services.transport import keys
from services.transport.keys import TransportDefaults
from services.transport.streams import StreamClient
from services.wire.events import CaptionStream, EndReason
from services.wire.load import LoadReport
from services.wire.settings import (
    QUESTIONS_FIELD,
    Question,
    StreamSettings,
    check_questions,
    questions_to_text,
    settings_from_hash,
    settings_to_hash,
)

if TYPE_CHECKING:
    from services.monitor.live import LiveMonitor

log = logging.getLogger(__name__)
# Fields of a session's config hash (beside its settings) that the gateway keeps for resumes.
ENDED_FIELD = "ended"  # "1" once the encoder has the end: a resume only replays events
LAST_SEQ_FIELD = "last_seq"  # the last audio seq, written with ENDED_FIELD
ABANDONED_FIELD = "abandoned"  # why the session cannot go on (its encoder state is gone)
CREATED_FIELD = "created"  # unix time the session was created; claims the session id
SECRET_FIELD = "secret_sha256"  # SHA-256 of the session's resume secret (never the secret)
TENANT_FIELD = "tenant"  # the tenant that created the session ("" = an open gateway's caller)
ENCODER_FIELD = "encoder"  # the encoder address of the gateway that created it (who holds its audio)
MAX_SECRET_CHARS = 128
_SAFE_ID = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
MAX_SESSION_ID = 64


def is_session_id(sid: str) -> bool:
    """Letters, digits, '-' and '_', 1 to 64 of them (what session ids may hold)."""
    return 0 < len(sid) <= MAX_SESSION_ID and set(sid) <= _SAFE_ID


@dataclass(frozen=True)
class GatewayLimits:
    """What one gateway accepts: sessions, audio, prompts, timeouts."""

    ENV_GROUP: ClassVar[str] = "GATEWAY"

    max_chunk_bytes: Annotated[int, "bytes per audio chunk (1 s of 48 kHz stereo 16-bit PCM)"] = 192_000
    max_session_seconds: Annotated[float, "s of audio one session may send"] = 6 * 3600.0
    idle_timeout_seconds: Annotated[float, "s without audio or keep-alive before a session is finalized"] = (
        30.0
    )
    first_message_timeout_seconds: Annotated[float, "s a new stream has to send its SessionConfig"] = 10.0
    resume_retention_seconds: Annotated[float, "s a dropped session waits for its client to resume"] = 60.0
    max_prompt_chars: Annotated[int, "characters in a prompt"] = 500
    max_new_tokens: Annotated[int, "tokens per live caption a client may ask for"] = 128
    max_sessions: Annotated[int, "live sessions this gateway serves at once"] = 256
    min_sample_rate_hz: Annotated[int, "lowest client sample rate, Hz"] = MIN_RATE
    max_sample_rate_hz: Annotated[int, "highest client sample rate, Hz"] = MAX_RATE
    max_channels: Annotated[int, "audio channels a client may send"] = MAX_CHANNELS
    lm_admission: Annotated[bool, "refuse new streams while every LM worker is full or behind"] = True
    retry_after_seconds: Annotated[float, "s a refused client is told to wait before trying again"] = 5.0
    max_streams_per_tenant: Annotated[
        int, "concurrent streams (gRPC and WebRTC) of one API key's tenant; 0 = any"
    ] = 64
    max_streams_per_address: Annotated[int, "concurrent streams from one client address; 0 = any"] = 64
    max_offline_calls: Annotated[int, "Caption/BatchCaption calls this gateway forwards at once"] = 16
    max_realtime_factor: Annotated[
        float, "audio may arrive at most this many times faster than real time (after the burst); 0 = any"
    ] = 2.0
    realtime_burst_seconds: Annotated[float, "s of audio a session may send ahead of that pace"] = 60.0
    max_silence_seconds: Annotated[
        float, "s a session may go without audio, keep-alives or not, before it is finalized"
    ] = 240.0
    drain_seconds: Annotated[
        float, "s open streams get to finish when the gateway stops (SIGTERM); new ones are refused"
    ] = 30.0
    monitoring: Annotated[
        bool, "watch the sessions this gateway takes audio for: rules, alerts, clips, history"
    ] = True


def check_limits(settings: StreamSettings, limits: GatewayLimits) -> None:
    """Validate a new session's settings, then hold them to this gateway's limits."""
    settings.validate()
    if len(settings.session.prompt) > limits.max_prompt_chars:
        raise InvalidArgument(f"prompt is longer than {limits.max_prompt_chars} characters")
    if settings.session.max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens is above the limit of {limits.max_new_tokens}")


class EncoderLink(Protocol):
    """How the gateway reaches the encoder service."""

    def open(self, sid: str, emit_seconds: float, reattach_only: bool = False) -> tuple[int, bool]: ...

    def push(
        self, sid: str, seq: int, samples: np.ndarray, end_of_stream: bool = False, first_seq: int = 0
    ) -> None: ...

    def close(self, sid: str, flush: bool) -> None: ...


@dataclass
class _Pending:
    """Converted client chunks waiting for the next push (in seq order)."""

    parts: list[np.ndarray] = field(default_factory=list)
    crcs: dict[int, int] = field(default_factory=dict)  # seq -> crc32 of the client's bytes
    first_seq: int = 0
    last_seq: int = 0
    size: int = 0  # samples
    closed: bool = False  # the resampler's tail was added (finalize)

    def add(self, seq: int, samples: np.ndarray, crc: int) -> None:
        if not self.parts:
            self.first_seq = seq
        self.parts.append(samples)
        self.crcs[seq] = crc
        self.last_seq, self.size = seq, self.size + samples.size

    def clear(self) -> None:
        self.parts, self.crcs, self.size = [], {}, 0


class LiveSession:
    def __init__(
        self,
        gateway: LiveGateway,
        sid: str,
        settings: StreamSettings,
        audio_seq: int = 0,
        resumed: bool = False,
        tenant: str = "",
        secret_hash: str = "",
    ) -> None:
        self.gateway = gateway
        self.sid = sid
        self.settings = settings
        self.tenant = tenant  # who owns the session
        self.secret_hash = secret_hash
        self.secret = ""  # the resume secret, known only to the call that created the session
        self.converter = PcmConverter(settings.sample_rate, settings.encoding, settings.channels)
        self.audio_seq = audio_seq
        self.resumed = resumed
        self.samples = 0
        self.ended = False  # no more audio will be accepted
        self.end_reason: EndReason | None = None  # why it ended early (IDLE), None for a finalize/close
        self.generation = 0  # bumped by every resume: only the newest call may detach the session
        self.last_activity = time.monotonic()
        self.last_audio = self.started = self.last_activity  # pace and silence are measured from here
        self.lock = threading.Lock()
        self._pending = _Pending()  # chunks accepted but not pushed to the encoder yet
        self._hop_samples = max(1, round(settings.session.hop_seconds * SAMPLE_RATE))
        self._next_push = self._hop_samples  # push once the audio reaches this many samples

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def feed(self, data: bytes, seq: int = 0) -> None:
        """Accept one client chunk (validated, converted to 16 kHz mono). Chunks are pushed to the
        encoder together, once the audio crosses the next hop (when the encoder publishes) or a
        second has gathered: one push per hop instead of one per chunk, with no added latency."""
        limits = self.gateway.limits
        if len(data) > limits.max_chunk_bytes:
            metrics.REJECTED_CHUNKS.labels(reason="oversized").inc()
            raise InvalidArgument(
                f"audio chunk of {len(data)} bytes exceeds the limit of {limits.max_chunk_bytes} bytes"
            )
        with self.lock:
            if self.ended:
                raise FailedPrecondition("the session was finalized; no more audio is accepted")
            if seq and seq <= self.audio_seq:  # a chunk the client sent again (after a reconnect)
                if self._pending.crcs.get(seq, zlib.crc32(data)) != zlib.crc32(data):
                    raise InvalidArgument(f"audio chunk seq {seq} was sent again with different bytes")
                self._push_due()  # the push that failed, if any, is tried again
                return
            if seq and seq != self.audio_seq + 1:
                raise InvalidArgument(f"audio chunk seq {seq} skips ahead of {self.audio_seq + 1}")
            t0 = time.monotonic()
            try:
                samples = self.converter.convert(data)
            except InvalidArgument:
                metrics.REJECTED_CHUNKS.labels(reason="malformed").inc()
                raise
            if (self.samples + samples.size) / SAMPLE_RATE > limits.max_session_seconds:
                raise ResourceExhausted(
                    f"the session reached its maximum of {limits.max_session_seconds:.0f} s"
                )
            self._check_pace(samples.size)
            self.audio_seq += 1
            self._pending.add(self.audio_seq, samples, zlib.crc32(data))
            self.samples += samples.size
            self.touch()
            self.last_audio = self.last_activity
            if self.gateway.monitor is not None:
                self.gateway.monitor.audio(self.sid, samples)
            self._push_due()
            metrics.CHUNK_SECONDS.observe(time.monotonic() - t0)

    def _check_pace(self, more: int) -> None:
        """Refuse audio that runs ahead of ``max_realtime_factor`` x real time by more than the
        burst: one client must not take the encoder and LM from everyone else."""
        lim = self.gateway.limits
        if lim.max_realtime_factor <= 0:
            return
        ahead = (self.samples + more) / SAMPLE_RATE - lim.realtime_burst_seconds
        allowed = lim.max_realtime_factor * (time.monotonic() - self.started)
        if ahead > allowed:
            wait = (ahead - allowed) / lim.max_realtime_factor
            metrics.REJECTED_CHUNKS.labels(reason="too_fast").inc()
            raise ResourceExhausted(
                f"audio arrives faster than {lim.max_realtime_factor:g}x real time; resume session "
                f"{self.sid} and send from seq {self.audio_seq + 1} in {wait:.1f} s, then at most that pace",
                retry_after=wait,
            )

    def _push_due(self) -> None:
        """Push what is pending once it reaches the next hop or a second of audio. A failed push
        leaves it pending (the client's chunks were accepted): the next feed tries again."""
        p = self._pending
        if not p.parts:
            return
        if self.samples < self._next_push and p.size < SAMPLE_RATE:
            return
        self._push_pending()
        while self._next_push <= self.samples:
            self._next_push += self._hop_samples

    def _push_pending(self, end_of_stream: bool = False) -> None:
        p = self._pending
        samples = np.concatenate(p.parts) if p.parts else np.zeros(0, dtype=np.float32)
        first = p.first_seq if len(p.parts) > 1 else 0
        self._push(p.last_seq, samples, end_of_stream, first)
        p.clear()

    def _push(self, seq: int, samples: np.ndarray, end_of_stream: bool = False, first_seq: int = 0) -> None:
        try:
            self.gateway.encoder.push(
                self.sid, seq, samples, end_of_stream=end_of_stream, first_seq=first_seq
            )
        except NotFound as e:
            reason = "the encoder lost its audio state (it restarted or expired the session)"
            self.gateway.abandon(self.sid, reason, self)
            raise FailedPrecondition(f"session {self.sid} cannot go on: {reason}; start a new session") from e

    def finalize(self) -> None:
        """No more audio: the encoder flushes, the LM writes the last final caption and the end."""
        with self.lock:
            if self.ended:
                return
            if not self._pending.closed:  # the resampler's tail, as one more chunk (once)
                tail = self.converter.flush()
                self._pending.add(self.audio_seq + 1, tail, 0)
                self._pending.closed = True
                self.samples += tail.size
            self._push_pending(end_of_stream=True)
            self.ended = True  # only once the encoder has the end (a failed finalize can be retried)
            self.audio_seq += 1
            self.gateway.mark_ended(self.sid, self.audio_seq)

    def close(self) -> None:
        """Stop now without captioning the open window."""
        with self.lock:
            if self.ended:
                return
            self.ended = True
            self.gateway.encoder.close(self.sid, flush=False)
            self.gateway.mark_ended(self.sid, self.audio_seq)

    def subscribe(self, cursor: str = "0-0", wake: threading.Event | None = None) -> Subscription:
        """This session's caption events after ``cursor``, as they come (unsubscribe when done)."""
        return self.gateway.hub.subscribe(self.sid, cursor, wake)


class LiveGateway:
    """Creates, resumes and reaps live sessions."""

    def __init__(
        self,
        client: redis.Redis,
        encoder: EncoderLink,
        limits: GatewayLimits | None = None,
        defaults: TransportDefaults | None = None,
    ) -> None:
        self.redis = client
        self.encoder = encoder
        self.limits = limits or GatewayLimits()
        self.defaults = defaults or TransportDefaults()
        self.captions = CaptionStream(StreamClient(client), self.defaults.captions_maxlen)
        self.hub = EventHub(client)
        lim = self.limits
        self.quotas = StreamQuotas(
            lim.max_streams_per_tenant, lim.max_streams_per_address, lim.retry_after_seconds
        )
        self._sessions: dict[str, LiveSession] = {}
        self._detached: dict[str, float] = {}  # sid -> monotonic time it lost its client
        self._lock = threading.Lock()
        self.monitor: LiveMonitor | None = None  # set by start_gateway when monitoring is on

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def encoder_name(self) -> str:
        """The encoder this gateway pushes to (recorded with each session it creates)."""
        return str(getattr(self.encoder, "target", ""))

    def create(self, settings: StreamSettings, session_id: str = "", tenant: str = "") -> LiveSession:
        """Register a new session in Redis and open its encoder session (no lock held over RPCs).

        The session belongs to ``tenant`` and gets a random resume secret (``session.secret``,
        returned to its client once; only its hash is stored)."""
        check_limits(settings, self.limits)
        sid = session_id or uuid.uuid4().hex
        if not is_session_id(sid):
            raise InvalidArgument("session_id may hold only letters, digits, '-' and '_' (at most 64)")
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise ResourceExhausted(
                    f"this gateway serves its maximum of {self.limits.max_sessions} sessions; "
                    f"retry in {self.limits.retry_after_seconds:.0f} s",
                    retry_after=self.limits.retry_after_seconds,
                )
        if self.limits.lm_admission:
            self._check_lm_capacity()
        secret = secrets.token_urlsafe(24)
        cfg = settings_to_hash(settings) | {
            CREATED_FIELD: f"{time.time():.3f}",
            SECRET_FIELD: secret_hash(secret),
            TENANT_FIELD: tenant,
            ENCODER_FIELD: self.encoder_name,
        }
        if not self.redis.hsetnx(
            keys.session_config(sid), CREATED_FIELD, cfg[CREATED_FIELD]
        ):  # claims the id
            raise InvalidArgument(f"session {sid} already exists; resume it instead")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.session_config(sid), mapping=cfg)
        pipe.expire(keys.session_config(sid), self.defaults.session_ttl_s)
        pipe.execute()
        try:
            self.encoder.open(sid, settings.session.hop_seconds)
        except BaseException:
            self.redis.delete(keys.session_config(sid))
            raise
        # Only now do LM workers see it: a session without an encoder session would wait forever.
        self.redis.zadd(keys.ACTIVE_SESSIONS, {sid: int(time.time() * 1000)})
        session = LiveSession(self, sid, settings, tenant=tenant, secret_hash=cfg[SECRET_FIELD])
        session.secret = secret
        with self._lock:
            self._sessions[sid] = session
            metrics.GATEWAY_SESSIONS.set(len(self._sessions))
        if self.monitor is not None:
            self.monitor.track(sid, tenant)
        log.info(
            "session %s started (%d Hz %s x%d, window %.1f s, hop %.1f s)",
            sid,
            settings.sample_rate,
            settings.encoding,
            settings.channels,
            settings.session.window_seconds,
            settings.session.hop_seconds,
        )
        return session

    def _check_lm_capacity(self) -> None:
        """Refuse a new stream while the LM workers that report cannot take one more: every one is
        full or behind, counting the active sessions none of them has taken yet. With no fresh
        report (no LM running yet) streams are admitted and wait for a worker."""
        now = time.time()
        stale = 3 * self.defaults.heartbeat_ms / 1000
        raw = self.redis.hgetall(keys.LM_WORKERS)
        reports = [LoadReport.from_text(v.decode()) for v in raw.values()]
        fresh = [r for r in reports if now - r.at <= stale]
        if not fresh:
            return
        held = sum(r.sessions for r in fresh)
        unadopted = max(0, int(self.redis.zcard(keys.ACTIVE_SESSIONS)) - held)
        if sum(r.free for r in fresh) - unadopted > 0:
            return
        behind = sum(r.behind for r in fresh)
        wait = self.limits.retry_after_seconds
        metrics.REJECTED_SESSIONS.labels(reason="lm_capacity").inc()
        raise ResourceExhausted(
            f"the caption workers cannot take another stream ({held} streams on {len(fresh)} workers, "
            f"{behind} of them behind); retry in {wait:.0f} s",
            retry_after=wait,
        )

    def owner(self, sid: str, fields: dict[str, str] | None = None) -> tuple[str, str]:
        """(tenant, secret hash) of a session, from this gateway's memory or its config hash."""
        with self._lock:
            known = self._sessions.get(sid)
        if known is not None:
            return known.tenant, known.secret_hash
        if fields is None:
            raw = self.redis.hmget(keys.session_config(sid), [TENANT_FIELD, SECRET_FIELD])
            fields = {TENANT_FIELD: (raw[0] or b"").decode(), SECRET_FIELD: (raw[1] or b"").decode()}
        return fields.get(TENANT_FIELD, ""), fields.get(SECRET_FIELD, "")

    def check_read(self, sid: str, principal: Principal, secret: str = "") -> None:
        """PermissionDenied unless ``principal`` may read the session (see ``may_read``)."""
        tenant, stored = self.owner(sid)
        if not may_read(principal, tenant, stored, secret[:MAX_SECRET_CHARS]):
            raise PermissionDenied(f"session {sid} belongs to someone else; its resume secret is needed")

    def resume(self, sid: str, secret: str = "", principal: Principal = ANONYMOUS) -> LiveSession:
        """Reattach to a session after a dropped connection (this gateway or another).

        The caller must hold the session's resume secret, or be of its tenant, or an admin
        (PERMISSION_DENIED otherwise). A session still taking audio must still be held by the
        encoder: when this gateway's encoder is the one that created it and has lost it, its audio
        state is gone (FAILED_PRECONDITION, the session is abandoned); when another encoder holds
        it, UNAVAILABLE (reconnect to the gateway that serves it) and the session is left alone. A
        finalized session takes no more audio and only replays its events."""
        with self._lock:
            known = self._sessions.get(sid)
        raw = self.redis.hgetall(keys.session_config(sid))
        if known is None and not raw:
            raise NotFound(f"session {sid} does not exist or has expired")
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        tenant, stored = self.owner(sid, fields)
        if not may_resume(principal, tenant, stored, secret[:MAX_SECRET_CHARS]):
            log.warning("refused a resume of session %s without its secret (caller %r)", sid, principal.name)
            raise PermissionDenied(
                f"resuming session {sid} needs its resume_secret (SessionStarted.resume_secret)"
            )
        if fields.get(ABANDONED_FIELD):
            raise FailedPrecondition(
                f"session {sid} can no longer be resumed: {fields[ABANDONED_FIELD]}; start a new session"
            )
        if known is not None:
            settings, ended, last_seq = known.settings, known.ended, known.audio_seq
        else:
            settings = settings_from_hash(raw)
            ended, last_seq = fields.get(ENDED_FIELD) == "1", int(fields.get(LAST_SEQ_FIELD, 0))
        if not ended:
            try:
                last_seq, _ = self.encoder.open(sid, settings.session.hop_seconds, reattach_only=True)
            except NotFound as e:
                holder = fields.get(ENCODER_FIELD, "")
                if known is None and holder and holder != self.encoder_name:
                    # Another gateway's encoder holds it: not this gateway's to give up on.
                    raise Unavailable(
                        f"session {sid} is served by another gateway and its encoder; reconnect to "
                        "that gateway to resume it"
                    ) from e
                # The encoder restarted or expired the session: its publications would restart at
                # seq 1 and never reach the captions.
                reason = "the encoder lost its audio state"
                if self.abandon(sid, reason, known):
                    raise FailedPrecondition(
                        f"session {sid} can no longer be resumed: {reason}; start a new session"
                    ) from e
                ended = True  # it had ended after all: replay its events
        with self._lock:
            self._detached.pop(sid, None)
            if sid in self._sessions:  # held here (or resumed concurrently through another call)
                s = self._sessions[sid]
                s.resumed = True
                s.generation += 1
                s.touch()
                return s
            session = LiveSession(
                self, sid, settings, audio_seq=last_seq, resumed=True, tenant=tenant, secret_hash=stored
            )
            session.ended = ended
            self._sessions[sid] = session
            metrics.GATEWAY_SESSIONS.set(len(self._sessions))
        if self.monitor is not None:  # from its first event: history is idempotent, firings claimed once
            self.monitor.track(sid, tenant, stream_time=None)
        return session

    def set_questions(self, session: LiveSession, questions: tuple[Question, ...]) -> None:
        """New questions for a session (validated); LM workers answer them from the next update."""
        check_questions(questions)
        with session.lock:
            session.settings = replace(
                session.settings, session=replace(session.settings.session, questions=questions)
            )
        self.redis.hset(keys.session_config(session.sid), QUESTIONS_FIELD, questions_to_text(questions))

    def set_questions_of(
        self, sid: str, questions: tuple[Question, ...], principal: Principal, secret: str = ""
    ) -> None:
        """``set_questions`` for a session held anywhere (the HTTP API): needs the session's
        tenant, the admin scope, or its resume secret."""
        check_questions(questions)
        if not self.redis.exists(keys.session_config(sid)):
            raise NotFound(f"session {sid} does not exist or has expired")
        self.check_read(sid, principal, secret)
        with self._lock:
            held = self._sessions.get(sid)
        if held is not None:
            self.set_questions(held, questions)
        else:
            self.redis.hset(keys.session_config(sid), QUESTIONS_FIELD, questions_to_text(questions))

    def mark_ended(self, sid: str, last_seq: int) -> None:
        """The encoder has the session's end: a resume from now on only replays events."""
        self.redis.hset(keys.session_config(sid), mapping={ENDED_FIELD: "1", LAST_SEQ_FIELD: str(last_seq)})

    def abandon(self, sid: str, reason: str, session: LiveSession | None = None) -> bool:
        """Give up on a session that cannot go on (its encoder state is gone): its clients get a
        fatal error and the end, LM workers let it go, later resumes are refused with ``reason``.

        Returns False when the session had in fact already ended (its caption stream holds its
        end): then it is only marked ended, and resumes replay its events."""
        already_ended = self.captions.has_ended(sid)
        if already_ended:
            self.redis.hset(keys.session_config(sid), ENDED_FIELD, "1")
        else:
            log.warning("abandoning session %s: %s", sid, reason)
            self.redis.hset(keys.session_config(sid), ABANDONED_FIELD, reason)
            self.captions.end_with_error(
                sid, f"{reason}; start a new session", "FAILED_PRECONDITION", "ENCODER_STATE_LOST"
            )
        self.redis.zrem(keys.ACTIVE_SESSIONS, sid)  # LM workers let it go (LMWorker._drop_abandoned)
        if session is not None:
            session.ended = True
            self.forget(session)
        return not already_ended

    def detach(self, session: LiveSession, generation: int | None = None) -> None:
        """The client went away without ending the session: keep it for a while for a resume.

        A call that was superseded by a resume (``generation`` older than the session's) leaves
        the session alone."""
        with self._lock:
            if generation is not None and generation != session.generation:
                return
            if session.ended:
                self._sessions.pop(session.sid, None)
            else:
                self._detached[session.sid] = time.monotonic()
            metrics.GATEWAY_SESSIONS.set(len(self._sessions))

    def forget(self, session: LiveSession) -> None:
        with self._lock:
            self._sessions.pop(session.sid, None)
            self._detached.pop(session.sid, None)
            metrics.GATEWAY_SESSIONS.set(len(self._sessions))

    def reap(self) -> list[str]:
        """Finalize sessions whose client did not come back within the retention time."""
        now = time.monotonic()
        with self._lock:
            expired = [
                sid for sid, t in self._detached.items() if now - t > self.limits.resume_retention_seconds
            ]
        for sid in expired:
            session = self._sessions.get(sid)
            if session is not None:
                try:
                    session.finalize()
                except MidashengError as e:  # the encoder may be gone; the session ends either way
                    log.warning("finalizing session %s (its client did not come back) failed: %s", sid, e)
                except Exception:
                    log.exception("finalizing session %s (its client did not come back) failed", sid)
                self.forget(session)
        return expired

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        self.hub.close()
