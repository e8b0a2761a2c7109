"""Reads each owned session's audio-token publications in ``seq`` order, at least once.

Every session has its own token stream and the LM workers share one consumer group on it. The
reader reads a worker's own pending entries first (after a takeover or a failed step), then new
ones, one publication per session at a time so that a session is captioned in order.

Why not :class:`services.transport.streams.Consumer` (the jobs worker's consumer): captions
must be applied in ``seq`` order per session, so a publication ahead of a missing one is held
back while the missing one is claimed (it may be pending under a stale owner), and a redelivered
``seq`` that was already applied is acked and skipped; the jobs queue has neither order nor
duplicates to care about. Failure counts live with the session (``OwnedSession.failures``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol

from lm_service.schedule import CaptionSchedule
from services import metrics
from services.errors import InvalidArgument
from services.transport.keys import TransportDefaults
from services.transport.streams import Entry, StreamClient
from services.wire.tokens import PAYLOAD_FIELD, TokenMessage, decode_tokens

log = logging.getLogger(__name__)
GROUP = "lm"
REPLAY_PAGE = 200  # token-stream entries read per call when rebuilding a taken-over session


class Unfit(Exception):
    """A publication that cannot be used for its session (malformed, or not its session's)."""

    def __init__(self, reason: str, msg: TokenMessage | None = None) -> None:
        super().__init__(reason)
        self.msg = msg


class PublicationReader:
    def __init__(
        self, streams: StreamClient, worker_id: str, defaults: TransportDefaults, group: str = GROUP
    ) -> None:
        self.streams = streams
        self.worker_id = worker_id
        self.defaults = defaults
        self.group = group

    def ensure_group(self, session: _Session) -> None:
        self.streams.ensure_group(session.stream, self.group, start="0")

    def read(self, sessions: Iterable[_Session], block_ms: int | None, count: int = 1) -> list[Entry]:
        """The next publications (up to ``count``) of each given session: its own pending entries
        first, else new ones, so that one stuck session does not hold up the others. Blocks at
        most ``block_ms`` (None = not at all)."""
        by_stream = {s.stream: s for s in sessions}
        if not by_stream:
            return []
        entries = self.streams.read_group(
            self.group, self.worker_id, {s: "0" for s in by_stream}, count=count, block_ms=None
        )
        busy = {e.stream for e in entries}
        fresh = {s: ">" for s in by_stream if s not in busy}
        if fresh:
            entries += self.streams.read_group(
                self.group, self.worker_id, fresh, count=count, block_ms=None if entries else block_ms
            )
        return entries

    def admit(self, session: _Session, entry: Entry, last: int | None = None) -> TokenMessage | None:
        """The entry's publication if it follows seq ``last`` (default: the session's last applied
        one); None when it is a duplicate (acked here) or must wait for a missing earlier one
        (claimed here; ``session.gap_since`` is set). Raises :class:`Unfit`."""
        if PAYLOAD_FIELD not in entry.fields:
            raise Unfit(f"stream entry has no {PAYLOAD_FIELD!r} field (fields: {sorted(entry.fields)})")
        try:
            sid, msg = decode_tokens(entry.fields[PAYLOAD_FIELD])
        except InvalidArgument as e:
            raise Unfit(str(e)) from e
        if sid != session.sid:
            raise Unfit(f"publication for session {sid!r} found in the stream of {session.sid!r}")
        last = session.schedule.last_seq if last is None else last
        if msg.seq <= last:
            self.streams.ack(entry.stream, self.group, entry.id)  # already applied (redelivery)
            metrics.LM_DUPLICATES.inc()
            return None
        if msg.seq > last + 1 and not session.allow_gap:
            # An earlier publication is pending under another consumer (a stale owner read it just
            # before losing the lease): claim it and retry in order; give up on it after a lease TTL.
            now = time.monotonic()
            session.gap_since = session.gap_since or now
            if now - session.gap_since < self.defaults.lease_ttl_ms / 1000:
                self.claim_pending(session)
                return None  # stays pending under this worker; re-read in id order next step
            log.error(
                "session %s: publications %d..%d never arrived; continuing without them",
                session.sid,
                last + 1,
                msg.seq - 1,
            )
        session.gap_since, session.allow_gap = None, False
        return msg

    def claim_pending(self, session: _Session) -> None:
        """Every pending entry of the session's stream becomes this worker's (it holds the lease)."""
        start = "0-0"
        while True:
            start, _, _ = self.streams.autoclaim(
                session.stream, self.group, self.worker_id, 0, start=start, count=100
            )
            if start in ("0-0", "0"):
                return

    def replay_applied(self, session: _Session) -> None:
        """Rebuild a taken-over session's token buffer from the retained publications an earlier
        owner already applied (``seq <= last_seq``)."""
        sched = session.schedule
        start = "-"
        while True:  # in pages: a long session's stream is never read in one reply
            page = self.streams.client.xrange(session.stream, start, "+", count=REPLAY_PAGE)
            for _entry_id, fields in page:
                try:
                    _, msg = decode_tokens(fields[PAYLOAD_FIELD.encode()])
                except (InvalidArgument, KeyError):
                    continue
                if msg.seq <= sched.last_seq:
                    try:
                        sched.ingest(msg)
                    except InvalidArgument as e:
                        # The stream's head was trimmed (tokens_maxlen): this publication keeps
                        # tentative tokens sent in one no longer there. The next self-contained
                        # one (the first of an encoder window) starts the buffer again; what the
                        # open segment needs lies after it.
                        log.info("session %s: replay skips publication %d (%s)", session.sid, msg.seq, e)
            if len(page) < REPLAY_PAGE:
                return
            last = page[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))  # after it

    def trim_applied(self, session: _Session, entry_id: str, msg: TokenMessage) -> None:
        """Publication ``msg`` (entry ``entry_id``) was applied: drop from the token stream what
        no owner can need again. A replay must start at a self-contained publication (one that
        keeps no tentative tokens sent before it) at or before the first token the next captions
        can need; everything older than the newest such publication goes (MINID, in whole
        radix-tree nodes). The encoder's ``tokens_maxlen`` stays as a backstop."""
        if msg.tentative_at <= msg.final_end:
            session.cut_points.append((entry_id, msg.token_start))
        needed = session.schedule.needed_from(msg.total_end)
        cut = max((i for i, (_, start) in enumerate(session.cut_points) if start <= needed), default=0)
        if cut == 0:  # nothing before the newest usable cut point, or none yet
            return
        self.streams.client.xtrim(session.stream, minid=session.cut_points[cut][0], approximate=True)
        del session.cut_points[:cut]


class _Session(Protocol):  # what the reader needs of an owned session (lm_service.ownership.OwnedSession)
    sid: str
    stream: str
    schedule: CaptionSchedule
    gap_since: float | None
    allow_gap: bool
    cut_points: list[tuple[str, int]]
