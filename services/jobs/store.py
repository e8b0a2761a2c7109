"""Jobs and adapters in Redis: one hash per job, a capped event stream per job, a jobs index, a registry.

Keys (all under ``mdl:``)::

    mdl:job:<id>          hash: doc (Job JSON), status, cancel ("1" once asked), events (last event id)
    mdl:job:<id>:events   stream of JobEvent JSON; entry id "<event_id>-0", capped at events_maxlen
    mdl:job:<id>:lease    owner token of the training worker running the job (PX TTL)
    mdl:jobs:index        sorted set of job ids, all score 0: ids sort by creation time (lex order)
    mdl:adapters          hash: adapter name -> Adapter JSON (the registry the LM service loads from)

Every write of a job goes through one Lua script, so the status check, the owner check (a worker
writes only while it holds the job's lease), the document and its event land together or not at all.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import redis

from services.errors import ConfigError, InvalidArgument, NotFound
from services.jobs.model import Adapter, AlreadyExists, EventKind, Job, JobEvent, JobStatus
from services.model.adapters import AdapterResolver, check_adapter_dir
from services.model.checkpoint import resolve_model_dir
from services.transport.connect import connect
from services.transport.keys import ADAPTERS, JOBS_INDEX, job_events_key, job_key, job_lease_key


@dataclass(frozen=True)
class JobDefaults:
    """Caps, TTLs and timeouts of the jobs service; every number carries its unit."""

    ENV_GROUP: ClassVar[str] = "JOBS"

    events_maxlen: Annotated[int, "events kept per job (oldest trimmed)"] = 10000
    jobs_stream_maxlen: Annotated[int, "queued job entries kept in the jobs stream"] = 100000
    lease_ttl_ms: Annotated[int, "ms after which a worker that stops heartbeating loses its job"] = 15000
    heartbeat_ms: Annotated[int, "ms between lease renewals (and job entry refreshes)"] = 3000
    claim_min_idle_ms: Annotated[int, "ms a job entry must idle before another worker takes it over"] = 30000
    max_attempts: Annotated[int, "training attempts (start, takeover, retry) before the job fails"] = 3
    block_ms: Annotated[int, "ms one blocking read waits at most"] = 1000
    page_size: Annotated[int, "jobs per list page by default"] = 20
    max_page_size: Annotated[int, "jobs per list page at most"] = 100

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"JobDefaults.{name} must be a positive integer, got {value!r}.")
        if not self.heartbeat_ms < self.lease_ttl_ms <= self.claim_min_idle_ms:
            raise ConfigError(
                "JobDefaults needs heartbeat_ms < lease_ttl_ms <= claim_min_idle_ms, so a live "
                "worker keeps its job and a dead one's lease has lapsed before its job is taken over."
            )


_WRITE_LUA = """
-- KEYS: job hash, events stream, lease
-- ARGV: owner ('' = no check), allowed statuses ('' = any, else ',a,b,'), doc ('' = keep), status,
--       event JSON ('' = none), events maxlen
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return {-1, ''}
end
local cur = redis.call('HGET', KEYS[1], 'status')
if ARGV[2] ~= '' and (not cur or not string.find(ARGV[2], ',' .. cur .. ',', 1, true)) then
  return {-2, cur or ''}
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'status', ARGV[4])
end
local n = 0
if ARGV[5] ~= '' then
  n = redis.call('HINCRBY', KEYS[1], 'events', 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], n .. '-0', 'e', ARGV[5])
end
return {n, cur or ''}
"""


class WriteRefused(Exception):
    """A guarded job write was refused: the lease is lost (``lease_lost``) or the status moved on."""

    def __init__(self, reason: str, status: str = "") -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


def new_job_id() -> str:
    """``job-`` + creation time in ms (12 hex digits) + 8 random hex: ids sort by creation time."""
    return f"job-{int(time.time() * 1000):012x}{os.urandom(4).hex()}"


def _token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _untoken(token: str) -> str:
    try:
        value = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise InvalidArgument("page_token is not a token this server returned.") from e
    if not value.isprintable() or not value:
        raise InvalidArgument("page_token is not a token this server returned.")
    return value


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class JobStore:
    """Typed access to jobs, their events and the adapter registry."""

    def __init__(self, client: redis.Redis, defaults: JobDefaults | None = None) -> None:
        self.client = client
        self.defaults = defaults or JobDefaults()
        self._write = client.register_script(_WRITE_LUA)

    @classmethod
    def from_url(cls, url: str, defaults: JobDefaults | None = None) -> JobStore:
        d = defaults or JobDefaults()
        timeout = d.block_ms / 1000 + 5.0
        return cls(connect(url, socket_timeout=timeout), d)

    def close(self) -> None:
        self.client.close()

    # --- jobs --------------------------------------------------------------------------------

    def create(self, job: Job, message: str) -> Job:
        """Store a new job (status VALIDATING) and its first event."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(JOBS_INDEX, {job.id: 0})
        pipe.execute()
        self.write(job, self.event(job, EventKind.STATUS, message))
        return job

    def get(self, job_id: str) -> Job:
        doc = self.client.hget(job_key(job_id), "doc")
        if doc is None:
            raise NotFound(f"Job {job_id!r} does not exist.")
        return Job.from_json(doc)

    def event(self, job: Job, kind: EventKind, message: str = "", **fields: Any) -> JobEvent:
        """An event carrying the job's status, step and total steps now."""
        base: dict[str, Any] = {"step": job.step, "total_steps": job.total_steps}
        base.update(fields)
        return JobEvent(
            job_id=job.id, kind=kind, status=job.status, message=message, created_at=time.time(), **base
        )

    def write(
        self,
        job: Job | None,
        event: JobEvent | None = None,
        *,
        job_id: str | None = None,
        owner: str = "",
        allowed: Iterable[JobStatus] = (),
    ) -> int:
        """Store ``job`` (None = keep the document) and append ``event``, atomically; returns the event id.

        With ``owner`` the write happens only while ``owner`` holds the job's lease; with ``allowed``
        only while the stored status is one of them. Otherwise :class:`WriteRefused`.
        """
        jid = job.id if job is not None else job_id or (event.job_id if event else "")
        allowed_arg = "," + ",".join(s.value for s in allowed) + "," if allowed else ""
        args = [
            owner,
            allowed_arg,
            job.to_json() if job else "",
            job.status.value if job else "",
            event.to_json() if event else "",
            self.defaults.events_maxlen,
        ]
        n, cur = self._write(keys=[job_key(jid), job_events_key(jid), job_lease_key(jid)], args=args)
        if int(n) == -1:
            raise WriteRefused("lease_lost")
        if int(n) == -2:
            raise WriteRefused("status", _text(cur))
        return int(n)

    def log(self, job: Job, message: str, owner: str = "", **fields: Any) -> int:
        return self.write(None, self.event(job, EventKind.LOG, message, **fields), job_id=job.id, owner=owner)

    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(job_key(job_id), "cancel") is not None

    def request_cancel(self, job_id: str) -> Job:
        """Flag the job for cancellation; a job not yet running is CANCELLED at once.

        A running job is stopped by its worker within one training step. Finished jobs are returned
        unchanged.
        """
        job = self.get(job_id)
        if job.status.terminal:
            return job
        self.client.hset(job_key(job_id), "cancel", "1")
        if job.status in (JobStatus.VALIDATING, JobStatus.QUEUED):
            done = job.evolve(status=JobStatus.CANCELLED, finished_at=time.time())
            try:
                self.write(
                    done,
                    self.event(done, EventKind.STATUS, "Cancelled before training started."),
                    allowed=(JobStatus.VALIDATING, JobStatus.QUEUED),
                )
            except WriteRefused:
                pass  # a worker started it meanwhile; it sees the flag within a step
        return self.get(job_id)

    def list_jobs(
        self, page_size: int = 0, page_token: str = "", statuses: Iterable[JobStatus] = ()
    ) -> tuple[list[Job], str]:
        """A page of jobs, newest first, and the token of the next page ("" = last page)."""
        size = min(max(page_size or self.defaults.page_size, 1), self.defaults.max_page_size)
        wanted = set(statuses)
        top = "+"
        if page_token:
            cursor = _untoken(page_token)
            if not cursor.startswith("job-"):
                raise InvalidArgument("page_token is not a token this server returned.")
            top = "(" + cursor
        jobs: list[Job] = []
        last = ""
        more = False
        for _ in range(20):  # bounded scan when a status filter skips many jobs
            ids = [_text(i) for i in self.client.zrevrangebylex(JOBS_INDEX, top, "-", start=0, num=size + 1)]
            more = len(ids) > size
            for jid in ids[:size]:
                last = jid
                try:
                    job = self.get(jid)
                except NotFound:
                    continue
                if not wanted or job.status in wanted:
                    jobs.append(job)
                    if len(jobs) == size:
                        break
            if len(jobs) == size or not more:
                break
            top = "(" + last
        more = more or (
            len(jobs) == size
            and bool(self.client.zrevrangebylex(JOBS_INDEX, "(" + last, "-", start=0, num=1))
        )
        return jobs, _token(last) if more and last else ""

    # --- events --------------------------------------------------------------------------------

    def events(self, job_id: str, after: int = 0, count: int = 1000) -> list[JobEvent]:
        """Stored events with id > ``after``, oldest first."""
        reply = self.client.xrange(job_events_key(job_id), f"{after + 1}-0", "+", count=count)
        return [JobEvent.from_json(f[b"e"], int(_text(i).split("-")[0])) for i, f in reply]

    def wait_events(self, job_id: str, after: int, block_ms: int | None = None) -> list[JobEvent]:
        """Events with id > ``after``, waiting at most ``block_ms`` for the first one."""
        block = min(block_ms or self.defaults.block_ms, self.defaults.block_ms)
        reply = self.client.xread({job_events_key(job_id): f"{after}-0"}, count=1000, block=block)
        out: list[JobEvent] = []
        for _stream, items in reply or []:
            out += [JobEvent.from_json(f[b"e"], int(_text(i).split("-")[0])) for i, f in items]
        return out

    # --- adapters -------------------------------------------------------------------------------

    def register_adapter(self, adapter: Adapter) -> None:
        """Add an adapter to the registry; AlreadyExists if the name is taken."""
        if not self.client.hsetnx(ADAPTERS, adapter.name, adapter.to_json()):
            raise AlreadyExists(f"An adapter named {adapter.name!r} already exists.")

    def adapter_exists(self, name: str) -> bool:
        return bool(self.client.hexists(ADAPTERS, name))

    def get_adapter(self, name: str) -> Adapter:
        doc = self.client.hget(ADAPTERS, name)
        if doc is None:
            raise NotFound(f"Adapter {name!r} is not registered.")
        return Adapter.from_json(doc)

    def list_adapters(
        self, page_size: int = 0, page_token: str = "", base_model: str = ""
    ) -> tuple[list[Adapter], str]:
        """A page of adapters, newest first, and the next page's token ("" = last page)."""
        size = min(max(page_size or self.defaults.page_size, 1), self.defaults.max_page_size)
        found = [Adapter.from_json(v) for v in self.client.hvals(ADAPTERS)]
        found = [a for a in found if not base_model or a.base_model == base_model]
        found.sort(key=lambda a: (a.created_at, a.name), reverse=True)
        start = 0
        if page_token:
            after = _untoken(page_token)
            start = next((i + 1 for i, a in enumerate(found) if a.name == after), len(found))
        page = found[start : start + size]
        more = start + size < len(found)
        return page, _token(page[-1].name) if more and page else ""


def adapters_in_registry(redis_url: str, base_model_dir: str | Path) -> AdapterResolver:
    """Adapters looked up by name in the jobs registry in Redis.

    Refuses an adapter trained on another base model than the one served (a clear error rather
    than garbage captions).
    """
    store = JobStore.from_url(redis_url)
    served = Path(base_model_dir).resolve()

    def resolve(name: str) -> Path:
        adapter = store.get_adapter(name)
        try:
            trained_on = resolve_model_dir(adapter.base_model).resolve()
        except Exception:  # e.g. a hub id while offline: compare by text
            trained_on = Path(adapter.base_model)
        if trained_on != served:
            raise InvalidArgument(
                f"Adapter {name!r} was trained on {adapter.base_model}, but this server serves {base_model_dir}."
            )
        return check_adapter_dir(name, Path(adapter.path))

    return resolve
