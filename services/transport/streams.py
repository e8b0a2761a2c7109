"""A thin typed layer over Redis Streams consumer groups: capped adds, reads, claims, dead letters.

Delivery is at-least-once: an entry stays in the group's pending-entries list (PEL) until it is
acked; a consumer that restarts reads its own pending entries first, and entries idle longer than
``claim_min_idle_ms`` (their consumer died) are claimed by another consumer. Redis counts every
delivery; an entry delivered more than ``max_deliveries`` times goes to ``DEAD_LETTERS``.

Every script here touches the keys of one hash slot (a stream and its ``counters_key``), so all of
it works on a Redis Cluster too. Reads over several streams (``read_group``, ``read_streams``)
are one command on a single server; on a Cluster, one per hash slot (see ``read_streams``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import NEVER_DECODE

from services.errors import InvalidArgument
from services.transport.connect import is_cluster, run_script, slot_groups
from services.transport.keys import (
    COUNTERS_PREFIX,
    DEAD_LETTERS,
    TransportDefaults,
    counters_key,
    session_of,
)

log = logging.getLogger(__name__)

FieldValue = bytes | str | int | float

CAPPED_XADD_LUA = """
-- XADD trimmed exactly to maxlen; the number of trimmed entries is added to the stream's counters
-- hash (same slot) under 'dropped:<counter>', so that no drop is silent. ttl > 0: the counters
-- expire with the session.
local function capped_xadd(stream, maxlen, counters, counter, fields, ttl)
  local before = redis.call('XLEN', stream)
  local id = redis.call('XADD', stream, 'MAXLEN', maxlen, '*', unpack(fields))
  local dropped = before + 1 - redis.call('XLEN', stream)
  if dropped > 0 then
    redis.call('HINCRBY', counters, 'dropped:' .. counter, dropped)
    if tonumber(ttl) > 0 then redis.call('EXPIRE', counters, ttl) end
  end
  return id
end
"""
"""Lua function ``capped_xadd(stream, maxlen, counters, counter, fields, ttl)``, shared with apply.py."""

_ADD_LUA = (
    CAPPED_XADD_LUA
    + """
-- KEYS: stream, its counters; ARGV: maxlen, counter name, counters ttl, kind, min id, field pairs...
-- ARGV[4] = 'deadletters': also count one dead letter (the dead-letter stream's own add).
-- ARGV[5] = an entry id: entries older than it are trimmed too (by age; '' = none).
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = capped_xadd(KEYS[1], ARGV[1], KEYS[2], ARGV[2], fields, ARGV[3])
if ARGV[4] == 'deadletters' then redis.call('HINCRBY', KEYS[2], 'deadletters', 1) end
if ARGV[5] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', ARGV[5]) end
return id
"""
)
_BYTES: dict[str, Any] = {NEVER_DECODE: True}  # values stay bytes even on a decoding client
CLUSTER_POLL_S = 0.02
"""On a Cluster, a blocking read over streams of several slots polls them every this many seconds."""


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
    """Parse an XAUTOCLAIM reply (raw, or parsed by redis-py) into (next start id, claimed
    entries, deleted ids).

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
        if item is None or item[0] is None:  # raw nil, or redis-py's parsed (None, None)
            continue
        if item[1] is None:
            deleted.append(as_text(item[0]))
        else:
            entries.append(Entry(stream, as_text(item[0]), _fields(item[1])))
    return as_text(reply[0]), entries, deleted


def parse_read(reply: Any) -> list[Entry]:
    """Parse an XREAD/XREADGROUP reply: raw (RESP2 list or RESP3 map; nil on timeout) or as
    redis-py's RESP2 callbacks leave it (``[[stream, [(id, {field: value})...]]]``)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, Mapping) else reply
    return [
        Entry(as_text(stream), as_text(item[0]), _fields(item[1]))
        for stream, items in pairs
        for item in items or []
    ]


def _pending_rows(reply: Any) -> list[tuple[str, int]]:
    """(entry id, deliveries) of an XPENDING range reply: raw rows or redis-py's dicts."""
    rows = []
    for row in reply or []:
        if isinstance(row, Mapping):
            rows.append((as_text(row["message_id"]), int(row["times_delivered"])))
        else:
            rows.append((as_text(row[0]), int(row[3])))
    return rows


def _read_args(
    streams: Mapping[str, str], count: int, block_ms: int | None, group: tuple[str, str] | None
) -> list[Any]:
    args: list[Any] = ["XREADGROUP", "GROUP", *group] if group else ["XREAD"]
    args += ["COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    return [*args, "STREAMS", *streams.keys(), *streams.values()]


def _check_block(block_ms: int | None) -> None:
    if block_ms is not None and (isinstance(block_ms, bool) or block_ms <= 0):
        raise InvalidArgument(
            f"block_ms must be a positive number of milliseconds or None, got {block_ms!r}."
        )


def read_streams(
    client: Any,
    raw: Any,
    streams: Mapping[str, str],
    count: int = 100,
    block_ms: int | None = 200,
    group: tuple[str, str] | None = None,
) -> list[Entry]:
    """XREAD (or, with ``group=(group, consumer)``, XREADGROUP) of several streams from the given
    ids, waiting at most ``block_ms`` (None = not at all) for the first entry. ``raw``: a client
    without reply callbacks on ``client``'s pool (``StreamClient`` has one), or ``client`` itself.

    On a single server (or Sentinel) this is one command. On a Redis Cluster a command may only
    name keys of one hash slot: streams of one slot are still one blocking command, streams of
    several slots are read with one non-blocking command per slot, pipelined (redis-py sends each
    node its commands together), every ``CLUSTER_POLL_S`` until something arrives or ``block_ms``
    has passed. That costs Redis one command per slot per poll while idle, which is why a gateway
    or LM worker with many sessions on a Cluster sends more commands than on a single server
    (``docs/deploy.md``)."""
    _check_block(block_ms)
    if not streams:
        raise InvalidArgument("a read needs at least one stream.")
    if not is_cluster(client):
        return parse_read(raw.execute_command(*_read_args(streams, count, block_ms, group), **_BYTES))
    groups = slot_groups(client, list(streams))
    if len(groups) == 1:
        return parse_read(client.execute_command(*_read_args(streams, count, block_ms, group), **_BYTES))
    deadline = time.monotonic() + (block_ms or 0) / 1000
    while True:
        pipe = client.pipeline(transaction=False)
        for keys in groups:
            pipe.execute_command(*_read_args({k: streams[k] for k in keys}, count, None, group))
        entries = [e for reply in pipe.execute() for e in parse_read(reply)]
        left = deadline - time.monotonic()
        if entries or left <= 0:
            return entries
        time.sleep(min(CLUSTER_POLL_S, left))


class StreamClient:
    """Typed Redis Streams operations over a redis-py client (composition, not inheritance): a
    ``redis.Redis`` (one server, Sentinel) or a ``redis.cluster.RedisCluster``.

    Replies are parsed here rather than by redis-py's callbacks, so the result types are the same
    for RESP2 and RESP3 and whatever ``decode_responses`` the given client uses. On a Cluster,
    redis-py's RESP2 callbacks run (its per-node clients are its own) and the parsers here accept
    their shapes too; a Cluster client must use RESP2 and not decode responses (``connect`` makes
    such clients).
    """

    def __init__(self, client: redis.Redis, defaults: TransportDefaults | None = None) -> None:
        self.client = client
        self.defaults = defaults or TransportDefaults()
        self.cluster = is_cluster(client)
        # Shares the connection pool; with no reply callbacks we see exactly what the server sent.
        self._raw: Any = client
        if not self.cluster:
            self._raw = redis.Redis(connection_pool=client.connection_pool)
            self._raw.response_callbacks.clear()
        self._add = client.register_script(_ADD_LUA)

    def _call(self, *args: Any) -> Any:
        return self._raw.execute_command(*args, **_BYTES)

    def _counter_ttl(self, stream: str) -> int:
        return self.defaults.session_ttl_s if session_of(stream) else 0

    def add(
        self, stream: str, fields: Mapping[str, FieldValue], maxlen: int, counter: str | None = None
    ) -> str:
        """Append an entry, trimming the stream to exactly ``maxlen`` entries; return its id.

        Trimmed entries are counted atomically in the stream's ``counters_key`` under
        ``dropped:<counter or stream>``. With a ``wait_replicas`` policy on the client
        (``services.transport.connect``) the add is confirmed by that many replicas.
        """
        check_maxlen(maxlen)
        args = [maxlen, counter or stream, self._counter_ttl(stream), "", "", *flatten_fields(fields)]
        keys = [stream, counters_key(stream)]
        return as_text(run_script(self.client, self._add, keys, args, f"XADD {stream}"))

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
        client's socket timeout must exceed ``block_ms``. Streams of several Cluster slots are
        read as ``read_streams`` says.
        """
        _check_block(block_ms)
        if not streams:
            raise InvalidArgument("read_group needs at least one stream.")
        return read_streams(self.client, self._raw, streams, count, block_ms, group=(group, consumer))

    def read(self, streams: Mapping[str, str], count: int = 100, block_ms: int | None = 200) -> list[Entry]:
        """XREAD of several streams after the given ids, waiting at most ``block_ms`` (None = not
        at all); slot-safe on a Cluster (``read_streams``)."""
        return read_streams(self.client, self._raw, streams, count, block_ms)

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
            if self.cluster:  # redis-py parses the reply of its own XPENDING range call only
                pipe.xpending_range(stream, group, entry_id, entry_id, 1)
            else:
                pipe.execute_command("XPENDING", stream, group, entry_id, entry_id, 1)
        return {i: n for reply in pipe.execute() for i, n in _pending_rows(reply)}

    def ack(self, stream: str, group: str, *ids: str) -> int:
        """XACK; returns how many of ``ids`` were pending."""
        if not ids:
            return 0
        return int(self._call("XACK", stream, group, *ids))

    def dead_letter(self, stream: str, group: str, entry: Entry, reason: str, deliveries: int) -> str:
        """Record ``entry`` in ``DEAD_LETTERS`` (counted there), then ack the original.

        Two commands, because the dead-letter stream and the original stream are in different
        slots on a Cluster: a crash between them leaves the entry pending, so it is redelivered and
        dead-lettered again (a dead letter may be recorded twice; none is lost). The record holds
        ``stream``, ``id``, ``group``, ``reason``, ``deliveries`` and the original fields under
        ``f:<name>``. Returns the dead-letter entry id.
        """
        record: dict[str, FieldValue] = {
            "stream": stream,
            "id": entry.id,
            "group": group,
            "reason": reason,
            "deliveries": deliveries,
        }
        record.update({f"f:{name}": value for name, value in entry.fields.items()})
        maxlen = self.defaults.deadletter_maxlen
        # Capped by count and by age: a dead letter older than deadletter_ttl_s goes.
        oldest = f"{max(0, int((time.time() - self.defaults.deadletter_ttl_s) * 1000))}-0"
        args = [maxlen, DEAD_LETTERS, 0, "deadletters", oldest, *flatten_fields(record)]
        keys = [DEAD_LETTERS, counters_key(DEAD_LETTERS)]
        dl_id = as_text(run_script(self.client, self._add, keys, args, f"dead letter of {stream}"))
        self.ack(stream, group, entry.id)
        return dl_id

    def counters(self, key: str | None = None) -> dict[str, int]:
        """Drop and dead-letter counters (``dropped:<name>``, ``deadletters``): of ``key``'s slot
        (a session's, the dead-letter stream's...), or summed over every counters hash."""
        if key is not None:
            names = [counters_key(key)]
        else:
            names = [as_text(k) for k in self.client.scan_iter(match=f"{COUNTERS_PREFIX}*", count=1000)]
        totals: dict[str, int] = {}
        for name in names:
            reply = self._call("HGETALL", name)
            items = reply.items() if isinstance(reply, Mapping) else zip(reply[::2], reply[1::2], strict=True)
            for k, v in items:
                totals[as_text(k)] = totals.get(as_text(k), 0) + int(v)
        return totals


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
