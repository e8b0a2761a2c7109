"""Streaming encoder sessions: buffer PCM per session, encode on each emit tick, publish tokens.

Each session publishes one ``AudioTokens`` entry per ``emit_interval`` of audio (the caption
hop): the tokens that became final since the last publication, then the tentative tail of the
still-open 10.08 s window. Publication ``seq`` numbers start at 1 and never repeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import numpy as np
import torch

from encoder_service.batcher import EncoderBatcher
from services import metrics
from services.constants import DEFAULT_HOP_SECONDS, ENCODER_WINDOW_SECONDS, SAMPLE_RATE
from services.errors import ConfigError, InvalidArgument, NotFound, ResourceExhausted
from services.model.modeling import MiDashengLM
from services.streaming.encoder import StreamingEncoderSession, TokenUpdate
from services.wire.tokens import TokenMessage, encode_tokens

log = logging.getLogger(__name__)
DEFAULT_EMIT_SECONDS = DEFAULT_HOP_SECONDS
MAX_PUSH_SAMPLES = SAMPLE_RATE * 10  # one push holds at most 10 s of audio
BATCH_TIMEOUT_S = 30.0  # longest wait for the device
# Relative L2 change below which a tentative token is not published again (the LM keeps the value
# it has); finals are always sent exactly. 0.01 keeps every caption, interim and final, of the demo
# model's test clips (tests/encoder_service/test_encoder_sessions.py); 0.02-0.05 send a third
# fewer tentative tokens but changed one interim caption in 108 there.
DEFAULT_TOLERANCE = 0.01
PAYLOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EncoderLimits:
    """What one encoder service holds and how it batches."""

    ENV_GROUP: ClassVar[str] = "ENCODER"

    max_sessions: Annotated[int, "streaming sessions held at once"] = 256
    max_batch: Annotated[int, "encoder windows per device batch"] = 32
    max_wait_ms: Annotated[float, "ms the batcher waits to fill a batch"] = 5.0
    max_queue: Annotated[int, "submissions waiting for the device before RESOURCE_EXHAUSTED"] = 256
    idle_seconds: Annotated[float, "s without audio after which a session is flushed and closed"] = 300.0
    tentative_tolerance: Annotated[
        float,
        "a tentative token is published again only once it moved more than this (relative L2) since last sent",
    ] = DEFAULT_TOLERANCE
    payload_dtype: Annotated[
        str, "audio tokens on the queue: auto (the model's), float32, bfloat16, float16"
    ] = "auto"
    max_lag_seconds: Annotated[
        float, "s windows may wait for the device before new sessions are refused (RESOURCE_EXHAUSTED)"
    ] = 2.0

    def __post_init__(self) -> None:
        if (
            min(self.max_sessions, self.max_batch, self.max_queue) < 1
            or self.max_wait_ms < 0
            or self.idle_seconds <= 0
            or self.tentative_tolerance < 0
            or self.payload_dtype not in PAYLOAD_DTYPES
        ):
            raise ConfigError(
                "EncoderLimits: max_sessions, max_batch and max_queue must be >= 1, max_wait_ms >= 0, "
                f"idle_seconds > 0, tentative_tolerance >= 0, payload_dtype one of {', '.join(PAYLOAD_DTYPES)}."
            )


Publisher = Callable[[str, bytes], None]  # (session id, serialized AudioTokens)


@dataclass
class PushResult:
    duplicate: bool
    final_tokens: int
    tentative_tokens: int
    stream_seconds: float


@dataclass
class _Unsent:
    """A computed publication not yet in Redis: sent again before anything new (tokens already
    consumed from the streaming session cannot be recomputed)."""

    payload: bytes
    seq: int
    final_published: int
    tentative: int
    num_final: int
    end: bool
    held: torch.Tensor | None = None  # the tentative tokens the LM holds once this is applied


@dataclass
class _State:
    sid: str
    stream: StreamingEncoderSession
    emit_samples: int
    next_emit: int
    last_audio_seq: int = 0
    pub_seq: int = 0
    final_published: int = 0
    tentative: int = 0
    closed: bool = False
    unsent: _Unsent | None = None
    sent_tentative: torch.Tensor | None = None  # what the LM holds for [final_published, ...), as sent
    last_push: tuple[int, int, int] = (0, 0, 0)  # first seq, last seq, samples of the last applied push
    touched: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class EncoderSessions:
    def __init__(
        self,
        model: MiDashengLM,
        batcher: EncoderBatcher,
        publish: Publisher,
        max_sessions: int = 256,
        tolerance: float = DEFAULT_TOLERANCE,
        payload_dtype: str = "auto",
        max_lag_s: float = 2.0,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.publish = publish
        self.max_sessions = max_sessions
        self.tolerance = tolerance
        self.max_lag_s = max_lag_s
        self.payload_dtype = model.dtype if payload_dtype == "auto" else getattr(torch, payload_dtype)
        self._sessions: dict[str, _State] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, sid: str, emit_seconds: float = 0.0, reattach_only: bool = False) -> tuple[int, bool]:
        """Create (or reattach to) a session; returns (last audio seq, reattached).

        With ``reattach_only`` a session this encoder does not hold is NotFound, not created."""
        if not sid:
            raise InvalidArgument("session_id is required")
        emit = emit_seconds or DEFAULT_EMIT_SECONDS
        if not 0.2 <= emit <= ENCODER_WINDOW_SECONDS:
            raise InvalidArgument(
                f"emit_interval_seconds must be within [0.2, {ENCODER_WINDOW_SECONDS}], got {emit}"
            )
        with self._lock:
            st = self._sessions.get(sid)
            if st is not None and not st.closed:
                return st.last_audio_seq, True
            if not reattach_only and self.batcher.wait_s > self.max_lag_s:
                metrics.REJECTED_SESSIONS.labels(reason="encoder_behind").inc()
                raise ResourceExhausted(
                    f"the encoder is behind (windows wait {self.batcher.wait_s:.1f} s for the device); "
                    "retry in 5 s",
                    retry_after=5.0,
                )
            if reattach_only:
                raise NotFound(
                    f"encoder session {sid!r} does not exist (the encoder restarted, expired or closed it)"
                )
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(f"this encoder holds its maximum of {self.max_sessions} sessions")
            cfg = self.model.config
            n = int(round(emit * SAMPLE_RATE))
            self._sessions[sid] = _State(
                sid,
                StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor),
                emit_samples=n,
                next_emit=n,
            )
            metrics.ENCODER_SESSIONS.set(len(self._sessions))
        return 0, False

    def _get(self, sid: str) -> _State:
        st = self._sessions.get(sid)
        if st is None:
            raise NotFound(f"encoder session {sid!r} does not exist")
        return st

    def push(
        self, sid: str, audio_seq: int, samples: np.ndarray, end_of_stream: bool = False, first_seq: int = 0
    ) -> PushResult:
        """Append audio chunks [first_seq, audio_seq] (one chunk when ``first_seq`` is 0)."""
        st = self._get(sid)
        if samples.size > MAX_PUSH_SAMPLES:
            raise InvalidArgument(f"a push holds {samples.size} samples; the limit is {MAX_PUSH_SAMPLES}")
        with st.lock:
            if st.closed:
                raise InvalidArgument(f"encoder session {sid!r} has ended")
            st.touched = time.monotonic()
            if audio_seq and audio_seq <= st.last_audio_seq:
                if end_of_stream and not st.closed:  # the end's emit failed earlier: do it now
                    self._emit(st, end=True)
                return PushResult(True, st.final_published, st.tentative, st.stream.seconds_received)
            first = first_seq or audio_seq
            if audio_seq and first_seq > audio_seq:
                raise InvalidArgument(f"first_seq {first_seq} is after seq {audio_seq}")
            if audio_seq and first > st.last_audio_seq + 1:
                raise InvalidArgument(f"audio seq {first} skips ahead of {st.last_audio_seq + 1}")
            push_first, applied = first, 0
            if audio_seq and first <= st.last_audio_seq:
                prev_first, prev_last, prev_samples = st.last_push
                if not (
                    first == prev_first and prev_last == st.last_audio_seq and samples.size > prev_samples
                ):
                    raise InvalidArgument(
                        f"audio chunks {first}..{audio_seq} overlap chunk {st.last_audio_seq}, applied"
                    )
                # The last push, resent with more chunks: it failed after its audio was applied
                # (its publication could not reach Redis). Only the new chunks are appended.
                applied = prev_samples
                samples = samples[prev_samples:]
            st.last_audio_seq = audio_seq or st.last_audio_seq + 1
            st.last_push = (push_first, st.last_audio_seq, applied + samples.size)
            if samples.size:
                st.stream.push(samples)
            if end_of_stream:
                self._emit(st, end=True)
            elif st.stream.samples_received >= st.next_emit:
                self._emit(st, end=False)
                while st.next_emit <= st.stream.samples_received:
                    st.next_emit += st.emit_samples
            return PushResult(False, st.final_published, st.tentative, st.stream.seconds_received)

    def close(self, sid: str, flush: bool) -> tuple[int, float]:
        """End a session: with ``flush`` the open window is closed and published as final;
        without, only the end is published. Idempotent."""
        st = self._sessions.get(sid)
        if st is None:
            raise NotFound(f"encoder session {sid!r} does not exist")
        with st.lock:
            if not st.closed:
                self._emit(st, end=True, flush=flush)
        with self._lock:
            self._sessions.pop(sid, None)
            metrics.ENCODER_SESSIONS.set(len(self._sessions))
        return st.final_published, st.stream.seconds_received

    def _emit(self, st: _State, end: bool, flush: bool = True) -> None:
        if st.unsent is not None:
            self._publish(st, st.unsent)  # raises again while Redis is unreachable
            if st.closed:
                return
        stream = st.stream
        if end and flush:
            stream.finish()
        jobs = stream.jobs(tentative=not end) if (flush or not end) else []
        updates: list[TokenUpdate] = []
        if jobs:
            feats = self.batcher.run(jobs, timeout=BATCH_TIMEOUT_S)
            for job, f in zip(jobs, feats, strict=True):
                updates.extend(stream.complete(job, f, self.model.audio_projector))
        finals = [u for u in updates if u.is_final]
        tentative = [u for u in updates if not u.is_final]
        parts: list[torch.Tensor] = []
        expected = st.final_published
        for u in finals:
            if u.token_start != expected:
                raise RuntimeError(f"final tokens out of order: got {u.token_start}, expected {expected}")
            parts.append(u.tokens)
            expected += int(u.tokens.shape[0])
        num_final = expected - st.final_published
        tail = tentative[-1] if tentative else None
        tentative_start, held = 0, None
        if tail is not None and tail.token_start == expected:
            skip, held = self._unchanged(st, expected, tail.tokens.to(self.payload_dtype))
            parts.append(tail.tokens[skip:])
            tentative_start = expected + skip if skip else 0
        hidden = self.model.config.hidden_size
        tokens = torch.cat(parts, dim=0) if parts else torch.zeros((0, hidden), dtype=self.model.dtype)
        tokens = tokens.to(self.payload_dtype)
        if tokens.shape[0] == 0 and not end:
            return
        msg = TokenMessage(
            seq=st.pub_seq + 1,
            token_start=st.final_published,
            tokens=tokens,
            num_final=num_final,
            stream_seconds=stream.seconds_received,
            end_of_stream=end,
            window_index=stream.closed_windows,
            revision=tail.revision if tail is not None else 0,
            audio_seq=st.last_audio_seq,
            tentative_start=tentative_start,
        )
        st.unsent = _Unsent(
            encode_tokens(st.sid, msg),
            msg.seq,
            expected,
            int(tokens.shape[0]) - num_final,
            num_final,
            end,
            held,
        )
        self._publish(st, st.unsent)

    def _unchanged(self, st: _State, start: int, tail: torch.Tensor) -> tuple[int, torch.Tensor]:
        """How many leading tokens of the tentative ``tail`` (from stream index ``start``) moved no
        more than the tolerance since they were last sent, and what the LM will then hold from
        ``start`` on (those kept values, then the rest of ``tail``)."""
        sent = st.sent_tentative
        if sent is None or not self.tolerance:
            return 0, tail
        offset = start - st.final_published  # sent covers [final_published, ...)
        old = sent[offset:] if offset >= 0 else sent[:0]
        n = min(int(old.shape[0]), int(tail.shape[0]))
        if n == 0:
            return 0, tail
        a, b = tail[:n].float(), old[:n].float()
        moved = (a - b).norm(dim=1) > self.tolerance * b.norm(dim=1).clamp(min=1e-12)
        skip = int(moved.to(torch.int8).argmax()) if bool(moved.any()) else n
        return skip, torch.cat([old[:skip].to(tail.dtype), tail[skip:]])

    def _publish(self, st: _State, u: _Unsent) -> None:
        self.publish(st.sid, u.payload)
        st.unsent = None
        st.pub_seq, st.final_published, st.tentative = u.seq, u.final_published, u.tentative
        st.sent_tentative = u.held
        metrics.TOKENS_PUBLISHED.labels(kind="final").inc(u.num_final)
        metrics.TOKENS_PUBLISHED.labels(kind="tentative").inc(u.tentative)
        if u.end:
            st.closed = True

    def expire_idle(self, idle_seconds: float) -> list[str]:
        """Close (with flush) sessions that received nothing for ``idle_seconds``."""
        now = time.monotonic()
        stale = [sid for sid, st in list(self._sessions.items()) if now - st.touched > idle_seconds]
        for sid in stale:
            log.warning("encoder session %s idle for %.0f s; closing it", sid, idle_seconds)
            try:
                self.close(sid, flush=True)
            except NotFound:
                pass
        return stale
