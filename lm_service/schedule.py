"""Per-session caption schedule: which windows to caption after each audio-token publication.

Pure state machine, no Redis or gRPC. Time is counted in 5 Hz audio tokens (200 ms).

Semantics (docs/api.md, "Caption events"):
- Segments are consecutive spans of ``window`` seconds: segment k covers [k*W, (k+1)*W).
- Every publication (one per ``hop`` of audio) yields an interim caption as a new revision of
  the open segment (when interim results are on): of the segment so far, [k*W, t]
  (``interim_window`` SEGMENT, the default), or of the last ``window`` seconds, [max(0, t - W), t]
  (SLIDING).
- Segment k turns final, captioned over exactly its span, once all its tokens are final; at the
  end of the stream the last partial segment turns final over what there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.constants import SEGMENT, TOKENS_PER_SECOND
from services.errors import InvalidArgument
from services.wire.settings import SessionSettings
from services.wire.tokens import TokenMessage

RETAIN_WINDOWS = 3  # token history kept, in windows


@dataclass(frozen=True)
class PlannedCaption:
    segment_id: int
    revision: int
    start_token: int
    end_token: int
    is_final: bool

    @property
    def window_start_seconds(self) -> float:
        return self.start_token / TOKENS_PER_SECOND

    @property
    def window_end_seconds(self) -> float:
        return self.end_token / TOKENS_PER_SECOND


@dataclass(frozen=True)
class ScheduleState:
    """Where a session's captions stand; advanced only once a publication's events are durable."""

    segments_final: int = 0  # segments [0, segments_final) are final
    open_revision: int = 0  # revisions already shown for the open segment
    last_seq: int = 0  # the last publication applied
    ended: bool = False

    def counters(self) -> dict[str, int]:
        """What the state hash keeps beside ``last_seq`` (which ``apply_once`` writes itself)."""
        return {"segments_final": self.segments_final, "open_revision": self.open_revision}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> ScheduleState:
        get = {k.decode(): int(float(v)) for k, v in raw.items()}
        return cls(get.get("segments_final", 0), get.get("open_revision", 0), get.get("last_seq", 0))


@dataclass
class CaptionSchedule:
    """Token buffer + segment counters of one live session."""

    settings: SessionSettings
    state: ScheduleState = field(default_factory=ScheduleState)
    _base: int = 0  # stream index of _tokens[0]
    _tokens: torch.Tensor | None = None
    _n_final: int = 0
    _n_total: int = 0
    stream_seconds: float = 0.0
    lost: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_final(self) -> int:
        return self._n_final

    def ingest(self, msg: TokenMessage) -> None:
        """Store the tokens of a publication: final ones at their index, then the tentative tail,
        which replaces what was held from ``msg.tentative_at`` on (the tentative tokens between
        the finals and it are kept: they did not change beyond the encoder's tolerance)."""
        n, hidden = int(msg.tokens.shape[0]), int(msg.tokens.shape[1])
        if not 0 <= msg.num_final <= n:
            raise InvalidArgument(f"num_final {msg.num_final} outside [0, {n}]")
        if self._tokens is None:
            self._tokens, self._base = msg.tokens.new_zeros((0, hidden)), msg.token_start
            self._n_final = msg.token_start
        elif msg.token_start > self._n_final:
            # A publication that held final tokens was lost (dead-lettered): remember the gap.
            self.lost.append((self._n_final, msg.token_start))
        if msg.token_start < self._base:  # rewinds before the retained history: start over there
            self._tokens, self._base = self._tokens[:0], msg.token_start
        held_end = self._base + self._tokens.shape[0]
        if msg.tentative_at > msg.final_end and msg.tentative_at > held_end:
            raise InvalidArgument(
                f"publication {msg.seq} keeps tentative tokens up to {msg.tentative_at} but only "
                f"{held_end} are held"
            )
        keep = self._tokens[: max(0, min(msg.token_start, held_end) - self._base)]
        gap = msg.token_start - (self._base + keep.shape[0])
        kept_tail = self._tokens[msg.final_end - self._base : msg.tentative_at - self._base]
        parts = [keep, msg.tokens.new_zeros((max(0, gap), hidden)), msg.tokens[: msg.num_final]]
        parts += [kept_tail.to(msg.tokens.dtype), msg.tokens[msg.num_final :]]
        buf = torch.cat(parts, dim=0)
        # Keep what the next captions can need: every token of a segment not yet final (finals
        # arrive in bursts of a whole 10.08 s encoder window) and the last window for interims.
        w = self.settings.window_tokens
        total = msg.total_end
        needed_from = self.needed_from(total)
        excess = min(buf.shape[0] - RETAIN_WINDOWS * w, needed_from - self._base)
        if excess > 0:
            buf, self._base = buf[excess:], self._base + excess
        self._tokens = buf
        self._n_final = msg.final_end
        self._n_total = total
        self.stream_seconds = msg.stream_seconds

    def needed_from(self, total: int) -> int:
        """The first stream token the next captions can need once ``total`` tokens are held: the
        open segment's first (finals arrive in bursts of a whole 10.08 s encoder window) or the
        last window's, whichever is earlier."""
        w = self.settings.window_tokens
        return max(0, min(self.state.segments_final * w, total - w))

    def window(self, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of the stream, (end - start, H)."""
        assert self._tokens is not None
        if start < self._base or end > self._base + self._tokens.shape[0]:
            raise InvalidArgument(f"tokens [{start}, {end}) are not retained")
        return self._tokens[start - self._base : end - self._base]

    @property
    def last_seq(self) -> int:
        return self.state.last_seq

    def plan(
        self, msg: TokenMessage, state: ScheduleState | None = None, interim: bool = True
    ) -> tuple[list[PlannedCaption], ScheduleState]:
        """Captions due after ``msg`` (already ingested) from ``state`` (default: the committed
        one), and the state once they are shown. Pure: the worker commits the state only once
        the events are durable. ``interim=False`` plans finals only (a newer publication of the
        same session is being captioned: its interim supersedes this one's)."""
        w = self.settings.window_tokens
        st = state or self.state
        n_final, n_total = msg.final_end, msg.total_end
        final, revision, ended = st.segments_final, st.open_revision, st.ended
        out: list[PlannedCaption] = []
        while (final + 1) * w <= n_final:
            out.append(PlannedCaption(final, revision, final * w, (final + 1) * w, True))
            final, revision = final + 1, 0
        if msg.end_of_stream:
            if n_final > final * w:
                out.append(PlannedCaption(final, revision, final * w, n_final, True))
                final, revision = final + 1, 0
            ended = True
        elif interim and self.settings.interim_results and n_total > final * w:
            start = final * w if self.settings.interim_window == SEGMENT else max(0, n_total - w)
            out.append(PlannedCaption(final, revision, start, n_total, False))
            revision += 1
        return out, ScheduleState(final, revision, msg.seq, ended)

    def advance(self, msg: TokenMessage) -> list[PlannedCaption]:
        """:meth:`plan` and commit at once (for callers without a durable step in between)."""
        plans, self.state = self.plan(msg)
        return plans
