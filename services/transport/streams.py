"""A thin typed layer over Redis Streams consumer groups: capped adds, reads, claims, dead letters.

Delivery is at-least-once: an entry stays in the group's pending-entries list (PEL) until it is
acked; a consumer that restarts reads its own pending entries first, and entries idle longer than
``claim_min_idle_ms`` (their consumer died) are claimed by another consumer. Redis counts every
delivery; an entry delivered more than ``max_deliveries`` times goes to ``DEAD_LETTERS``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import NEVER_DECODE

from services.errors import InvalidArgument
from services.transport.keys import COUNTERS, DEAD_LETTERS, TransportDefaults

log = logging.getLogger(__name__)

FieldValue = bytes | str | int | float

CAPPED_XADD_LUA = """
-- XADD trimmed exactly to maxlen; the number of trimmed entries is added to the counters hash
-- under 'dropped:<counter>', so that no drop is silent.
local function capped_xadd(stream, maxlen, counters, counter, fields)
  local before = redis.call('XLEN', stream)
  local id = redis.call('XADD', stream, 'MAXLEN', maxlen, '*', unpack(fields))
  local dropped = before + 1 - redis.call('XLEN', stream)
  if dropped > 0 then
    redis.call('HINCRBY', counters, 'dropped:' .. counter, dropped)
  end
  return id
end
"""
"""Lua function ``capped_xadd(stream, maxlen, counters, counter, fields)``, shared with apply.py."""

_ADD_LUA = (
    CAPPED_XADD_LUA
    + """
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
return capped_xadd(KEYS[1], ARGV[1], KEYS[2], ARGV[2], fields)
"""
)

_DEAD_LETTER_LUA = (
    CAPPED_XADD_LUA
    + """
-- KEYS: dead-letter stream, counters, original stream; ARGV: maxlen, group, id, record pairs...
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = capped_xadd(KEYS[1], ARGV[1], KEYS[2], KEYS[1], fields)
redis.call('HINCRBY', KEYS[2], 'deadletters', 1)
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
return id
"""
)


@dataclass(frozen=True)
class Entry:
    """One stream entry: stream name and id as text, field names as text, field values as bytes.

    A pending entry whose payload was trimmed from the stream before it was acked comes back
    with no fields (XADD always stores at least one), see ``trimmed``.
    """

    stream: str
    id: str
    fields: dict[str, bytes]

    @property
    def trimmed(self) -> bool:
        return not self.fields


def as_text(value: Any) -> str:
    """A reply value (bytes or text, by the client's decoding) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_time(entry_id: str) -> float:
    """Seconds since the epoch at which a stream entry was added (its id's millisecond part)."""
    return int(entry_id.split("-")[0]) / 1000.0


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _fields(raw: Any) -> dict[str, bytes]:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {as_text(k): _bytes(v) for k, v in raw.items()}
    return {as_text(raw[i]): _bytes(raw[i + 1]) for i in range(0, len(raw), 2)}


def flatten_fields(fields: Mapping[str, FieldValue]) -> list[FieldValue]:
    """``{name: value}`` as ``[name, value, ...]`` command arguments; at least one field."""
    if not fields:
        raise InvalidArgument("A stream entry needs at least one field.")
    out: list[FieldValue] = []
    for name, value in fields.items():
        if not isinstance(value, bytes | str | int | float) or isinstance(value, bool):
            raise InvalidArgument(
                f"Field {name!r} must be bytes, str, int or float, got {type(value).__name__}."
            )
        out += [name, value]
    return out


def check_maxlen(maxlen: int) -> None:
    """Raise InvalidArgument unless ``maxlen`` is a positive int (a stream cap)."""
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
        raise InvalidArgument(f"maxlen must be a positive integer, got {maxlen!r}.")


def parse_autoclaim(stream: str, reply: Sequence[Any]) -> tuple[str, list[Entry], list[str]]:
    """Parse a raw XAUTOCLAIM reply into (next start id, claimed entries, deleted ids).

    Redis 7 replies ``[next, entries, deleted_ids]`` and drops deleted entries from the PEL.
    Redis 6.2 replies ``[next, entries]``; an entry deleted from the stream shows up there as
    nil or ``[id, nil]`` and stays pending, so those ids are reported as deleted when known.
    """
    if len(reply) not in (2, 3):
        raise ValueError(
            f"XAUTOCLAIM replied with {len(reply)} elements; expected 2 (Redis 6.2) or 3 (Redis 7)."
        )
    entries: list[Entry] = []
    deleted = [as_text(i) for i in reply[2]] if len(reply) == 3 and reply[2] else []
    for item in reply[1] or []:
        if item is None:
            continue
        if item[1] is None:
            deleted.append(as_text(item[0]))
        else:
            entries.append(Entry(stream, as_text(item[0]), _fields(item[1])))
    return as_text(reply[0]), entries, deleted


def parse_read(reply: Any) -> list[Entry]:
    """Parse a raw XREAD/XREADGROUP reply (RESP2 list or RESP3 map; nil on timeout)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, Mapping) else reply
    return [
        Entry(as_text(stream), as_text(item[0]), _fields(item[1]))
        for stream, items in pairs
        for item in items or []
    ]


class StreamClient:
    """Typed Redis Streams operations over a ``redis.Redis`` client (composition, not inheritance).

    Replies are parsed here rather than by redis-py's callbacks, so the result types are the same
    for RESP2 and RESP3 and whatever ``decode_responses`` the given client uses.
    """

    def __init__(self, client: redis.Redis, defaults: TransportDefaults | None = None) -> None:
        self.client = client
        self.defaults = defaults or TransportDefaults()
        # Shares the connection pool; with no reply callbacks we see exactly what the server sent.
        self._raw = redis.Redis(connection_pool=client.connection_pool)
        self._raw.response_callbacks.clear()
        self._add = client.register_script(_ADD_LUA)
        self._dead_letter = client.register_script(_DEAD_LETTER_LUA)

    def _call(self, *args: Any) -> Any:
        return self._raw.execute_command(*args, **{NEVER_DECODE: True})

    def add(
        self, stream: str, fields: Mapping[str, FieldValue], maxlen: int, counter: str | None = None
    ) -> str:
        """Append an entry, trimming the stream to exactly ``maxlen`` entries; return its id.

        Trimmed entries are counted atomically in ``COUNTERS`` under ``dropped:<counter or stream>``.
        """
        check_maxlen(maxlen)
        args = [maxlen, counter or stream, *flatten_fields(fields)]
        return as_text(self._add(keys=[stream, COUNTERS], args=args))

    def ensure_group(self, stream: str, group: str, start: str = "0") -> None:
        """Create the consumer group (and the stream) unless it exists; ``start`` "0" = all history."""
        try:
            self._call("XGROUP", "CREATE", stream, group, start, "MKSTREAM")
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_group(
        self,
        group: str,
        consumer: str,
        streams: Mapping[str, str],
        count: int = 100,
        block_ms: int | None = 200,
    ) -> list[Entry]:
        """XREADGROUP: per stream, id "0" = this consumer's pending entries, ">" = new entries.

        Blocks at most ``block_ms`` (None = do not block); waiting forever is not offered. The
        client's socket timeout must exceed ``block_ms``.
        """
        if block_ms is not None and (isinstance(block_ms, bool) or block_ms <= 0):
            raise InvalidArgument(
                f"block_ms must be a positive number of milliseconds or None, got {block_ms!r}."
            )
        if not streams:
            raise InvalidArgument("read_group needs at least one stream.")
        args: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", *streams.keys(), *streams.values()]
        return parse_read(self._call(*args))

    def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, start: str = "0-0", count: int = 100
    ) -> tuple[str, list[Entry], list[str]]:
        """XAUTOCLAIM entries idle at least ``min_idle_ms``; see ``parse_autoclaim`` for the result.

        Each claim counts as a delivery. Scan the whole PEL by passing the returned start id back
        in until it is "0-0".
        """
        reply = self._call("XAUTOCLAIM", stream, group, consumer, min_idle_ms, start, "COUNT", count)
        return parse_autoclaim(stream, reply)

    def delivery_counts(self, stream: str, group: str, ids: Iterable[str]) -> dict[str, int]:
        """How many times each id was delivered; ids no longer pending are left out."""
        ids = list(ids)
        if not ids:
            return {}
        pipe = self._raw.pipeline(transaction=False)
        for entry_id in ids:
            pipe.execute_command("XPENDING", stream, group, entry_id, entry_id, 1)
        counts: dict[str, int] = {}
        for reply in pipe.execute():
            for entry_id, _consumer, _idle_ms, deliveries in reply or []:
                counts[as_text(entry_id)] = int(deliveries)
        return counts

    def ack(self, stream: str, group: str, *ids: str) -> int:
        """XACK; returns how many of ``ids`` were pending."""
        if not ids:
            return 0
        return int(self._call("XACK", stream, group, *ids))

    def dead_letter(self, stream: str, group: str, entry: Entry, reason: str, deliveries: int) -> str:
        """Atomically record ``entry`` in ``DEAD_LETTERS``, count it, and ack the original.

        The record holds ``stream``, ``id``, ``group``, ``reason``, ``deliveries`` and the original
        fields under ``f:<name>``. Returns the dead-letter entry id.
        """
        record: dict[str, FieldValue] = {
            "stream": stream,
            "id": entry.id,
            "group": group,
            "reason": reason,
            "deliveries": deliveries,
        }
        record.update({f"f:{name}": value for name, value in entry.fields.items()})
        args = [self.defaults.deadletter_maxlen, group, entry.id, *flatten_fields(record)]
        return as_text(self._dead_letter(keys=[DEAD_LETTERS, COUNTERS, stream], args=args))

    def counters(self) -> dict[str, int]:
        """The drop and dead-letter counters (``dropped:<stream>``, ``deadletters``)."""
        reply = self._call("HGETALL", COUNTERS)
        items = reply.items() if isinstance(reply, Mapping) else zip(reply[::2], reply[1::2], strict=True)
        return {as_text(k): int(v) for k, v in items}


class Consumer:
    """The standard at-least-once loop on one stream for one named consumer of a group.

    ``poll()`` returns, in this order of preference: this consumer's own pending entries (left from
    before a restart), entries claimed from consumers idle longer than ``claim_min_idle_ms``, and
    new entries (blocking at most ``block_ms``). Entries delivered more than ``max_deliveries``
    times are dead-lettered instead of returned. Call ``ack`` once an entry's effect is durable,
    or ``fail``. Processing one entry must take less than ``claim_min_idle_ms``, or another
    consumer claims it (a second delivery, which idempotent processing absorbs).
    """

    def __init__(
        self,
        streams: StreamClient,
        stream: str,
        group: str,
        consumer: str,
        defaults: TransportDefaults | None = None,
        *,
        count: int = 100,
        start: str = "0",
    ) -> None:
        self.streams = streams
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.defaults = defaults or streams.defaults
        self.count = count
        self._own_cursor: str | None = "0"  # None once our pending entries have been read back
        self._claim_cursor = "0-0"
        streams.ensure_group(stream, group, start)

    def poll(self) -> list[Entry]:
        """The next batch to process (possibly empty); see the class docstring for the order."""
        if self._own_cursor is not None:
            own = self.streams.read_group(
                self.group, self.consumer, {self.stream: self._own_cursor}, self.count, block_ms=None
            )
            if own:
                self._own_cursor = own[-1].id
                return self._screen(own)
            self._own_cursor = None
        self._claim_cursor, claimed, deleted = self.streams.autoclaim(
            self.stream,
            self.group,
            self.consumer,
            self.defaults.claim_min_idle_ms,
            self._claim_cursor,
            self.count,
        )
        if deleted:
            # Redis 7 already dropped these from the PEL; acking also covers Redis 6.2.
            self.streams.ack(self.stream, self.group, *deleted)
        if claimed:
            return self._screen(claimed)
        return self.streams.read_group(
            self.group, self.consumer, {self.stream: ">"}, self.count, block_ms=self.defaults.block_ms
        )

    def _screen(self, entries: list[Entry]) -> list[Entry]:
        """Drop redelivered entries that were trimmed, acked meanwhile, or delivered too often."""
        trimmed = [e.id for e in entries if e.trimmed]
        if trimmed:
            # Their loss was counted when the stream was trimmed; keep the PEL from growing.
            self.streams.ack(self.stream, self.group, *trimmed)
        live = [e for e in entries if not e.trimmed]
        counts = self.streams.delivery_counts(self.stream, self.group, [e.id for e in live])
        limit = self.defaults.max_deliveries
        keep: list[Entry] = []
        for entry in live:
            deliveries = counts.get(entry.id)
            if deliveries is None:
                continue  # acked by another consumer since it was read
            if deliveries > limit:
                self.streams.dead_letter(
                    self.stream, self.group, entry, f"exceeded {limit} deliveries", deliveries
                )
                log.warning("dead-lettered %s %s after %d deliveries", self.stream, entry.id, deliveries)
            else:
                keep.append(entry)
        return keep

    def ack(self, entry: Entry) -> int:
        """Acknowledge an entry whose effect is durable; returns 1 if it was still pending."""
        return self.streams.ack(self.stream, self.group, entry.id)

    def fail(self, entry: Entry, reason: str, poison: bool = False) -> str | None:
        """Give up on an entry for now.

        ``poison=False``: leave it pending; it is redelivered (claimed) after ``claim_min_idle_ms``
        and dead-lettered once it exceeds ``max_deliveries``. ``poison=True`` (e.g. an unparseable
        payload): dead-letter it at once with ``reason``; returns the dead-letter id.
        """
        if not poison:
            log.warning("processing %s %s failed, will be retried: %s", self.stream, entry.id, reason)
            return None
        deliveries = self.streams.delivery_counts(self.stream, self.group, [entry.id]).get(entry.id, 1)
        return self.streams.dead_letter(self.stream, self.group, entry, reason, deliveries)
