"""Apply one consumed entry's effects exactly once per (session, seq), under a lease, atomically.

``apply_once`` is a single Lua script, so the lease check, the duplicate check, the output
XADDs, the state update and the XACK happen together or not at all. That is what makes
"ack only after the effect is durable" and "redelivery is idempotent on (session, seq)" hold
when a worker dies at any point or two workers briefly believe they own a session.

Every key the script touches (lease, state, acked stream, outputs and their counters) must share
one hash tag, a session's (``keys.same_slot``): the script is then legal on a Redis Cluster, and a
key of another slot is refused here on any Redis, so a cross-slot write cannot creep in unseen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import redis
from redis.commands.core import Script

from services.errors import InvalidArgument
from services.transport.connect import run_script
from services.transport.keys import counters_key, same_slot, session_of
from services.transport.streams import CAPPED_XADD_LUA, FieldValue, as_text, check_maxlen, flatten_fields


class ApplyStatus(StrEnum):
    APPLIED = "applied"
    """Outputs written, state updated, entry acked."""
    DUPLICATE = "duplicate"
    """``seq`` was already applied: nothing written, entry acked."""
    LEASE_LOST = "lease_lost"
    """Another owner holds the lease: nothing written, entry left pending for the new owner."""


_APPLY_LUA = (
    CAPPED_XADD_LUA
    + """
-- KEYS: lease, state, ack stream, counters, output streams...
-- ARGV: owner, seq, group, entry id, ttl_s, n update args, update pairs...,
--       then per output: maxlen, n field args, field pairs...
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'lease_lost'}
end
local last = redis.call('HGET', KEYS[2], 'last_seq')
if last and tonumber(last) >= tonumber(ARGV[2]) then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
  return {'duplicate'}
end
local n_updates = tonumber(ARGV[6])
local state = {'last_seq', ARGV[2]}
for i = 7, 6 + n_updates do state[#state + 1] = ARGV[i] end
local result = {'applied'}
local pos = 7 + n_updates
for k = 5, #KEYS do
  local maxlen = ARGV[pos]
  local n_fields = tonumber(ARGV[pos + 1])
  local fields = {}
  for i = pos + 2, pos + 1 + n_fields do fields[#fields + 1] = ARGV[i] end
  pos = pos + 2 + n_fields
  result[#result + 1] = capped_xadd(KEYS[k], maxlen, KEYS[4], KEYS[k], fields, ARGV[5])
end
redis.call('HSET', KEYS[2], unpack(state))
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
return result
"""
)


# Registered once (its SHA1 computed once); EVALSHA on each call, loaded again if the server lost it.
_APPLY = Script(None, _APPLY_LUA.encode())


def apply_once(
    client: redis.Redis,
    *,
    lease_key: str,
    owner: str,
    state_key: str,
    seq: int,
    ack_stream: str,
    group: str,
    entry_id: str,
    outputs: Sequence[tuple[str, Mapping[str, FieldValue], int]],
    state_updates: Mapping[str, str | int | float] | None = None,
    ttl_s: int,
) -> tuple[ApplyStatus, list[str]]:
    """Atomically apply the effects of entry ``entry_id`` (sequence number ``seq``).

    - ``lease_key`` not held by ``owner``: ``LEASE_LOST``; nothing written, entry not acked.
    - ``state_key``'s ``last_seq`` >= ``seq``: ``DUPLICATE``; entry acked, nothing else written.
    - otherwise ``APPLIED``: each ``(stream, fields, maxlen)`` output is XADDed, trimmed exactly
      to ``maxlen`` with drops counted as in ``StreamClient.add``; the state hash gets
      ``last_seq = seq`` plus ``state_updates`` and expires after ``ttl_s``; the entry is acked.

    Every key must be in the lease's slot (one session's keys), else InvalidArgument. With a
    ``wait_replicas`` policy on the client, an applied write is confirmed by replicas
    (``services.transport.connect.run_script``).

    Returns the status and the ids of the output entries (empty unless applied), in order.
    """
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise InvalidArgument(f"seq must be a non-negative integer, got {seq!r}.")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
        raise InvalidArgument(f"ttl_s must be a positive number of seconds, got {ttl_s!r}.")
    updates = dict(state_updates or {})
    if "last_seq" in updates:
        raise InvalidArgument("state_updates must not set last_seq; it is set from seq.")
    update_args = flatten_fields(updates) if updates else []
    args: list[Any] = [owner, seq, group, entry_id, ttl_s, len(update_args), *update_args]
    keys = [lease_key, state_key, ack_stream, counters_key(lease_key)]
    for stream, fields, maxlen in outputs:
        check_maxlen(maxlen)
        flat = flatten_fields(fields)
        keys.append(stream)
        args += [maxlen, len(flat), *flat]
    if not same_slot(*keys):
        raise InvalidArgument(
            f"apply_once touches keys of several hash slots ({', '.join(keys)}): a script may only "
            "touch one session's keys (one slot on a Redis Cluster)."
        )
    session = session_of(lease_key) or lease_key
    reply = run_script(client, _APPLY, keys, args, f"apply of session {session} seq {seq}")
    return ApplyStatus(as_text(reply[0])), [as_text(i) for i in reply[1:]]
