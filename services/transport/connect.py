"""One way to reach Redis for every tier: a single server, Sentinel, or Cluster, chosen by the URL.

Every process that talks to Redis (gateway, encoder, LM workers, jobs API, training workers,
``midasheng up``, the benchmarks) calls :func:`connect` with its ``REDIS_URL``:

``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``, ``unix:///path.sock``
    one server (redis-py's own URL syntax and query options).
``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``
    the primary of ``service`` as the Sentinels report it; after a failover the client reconnects
    to the new primary. ``rediss+sentinel://`` uses TLS to the data nodes (and, with
    ``sentinel_tls=1``, to the Sentinels).
``redis+cluster://[[user]:password@]host:port[,host:port...]``
    a Redis Cluster from any of its nodes; ``rediss+cluster://`` with TLS.

Query options of the ``+sentinel`` and ``+cluster`` forms: ``sentinel_password`` (when the
Sentinels have their own password), ``sentinel_tls``, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs`` (TLS material as files) and, for every form,
``wait_replicas=N`` with ``wait_timeout_ms=T``: each audio-token publication and each caption
write (:func:`run_script`) is followed, on the same connection, by ``WAIT N T``, so that what a
service has been told is written is on ``N`` replicas before it goes on. A primary that crashes
then cannot take acknowledged captions with it: the replica promoted by the failover has them.
A write that ``N`` replicas did not confirm within ``T`` ms stays written (the primary has it);
it is counted (``midasheng_redis_unreplicated_writes_total``) and logged, and writes to that node
skip the WAIT for ``UNREPLICATED_BACKOFF_S`` (counted too) before it is tried again: a primary
left without replicas (its replica was just promoted, or is down) must not slow every write by
``T``.

Sentinel and Cluster clients retry a failed command for about ``FAILOVER_RETRY_S`` seconds with a
capped backoff, long enough for a failover (Sentinel ``down-after-milliseconds`` plus the
election, or a Cluster ``cluster-node-timeout`` plus the election) when those are configured as in
``deploy/``. What each tier does meanwhile is in ``docs/deploy.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel

from services import metrics
from services.errors import ConfigError

log = logging.getLogger(__name__)

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
FAILOVER_RETRY_S = 9.0
"""How long a Sentinel or Cluster client keeps retrying one command (0.1 s doubling to 0.5 s)."""
_RETRY_BASE_S, _RETRY_CAP_S = 0.05, 0.5
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_KNOWN_OPTIONS = {"sentinel_password", "sentinel_tls", "wait_replicas", "wait_timeout_ms", *_TLS_OPTIONS}
_WARN_EVERY_S = 30.0
UNREPLICATED_BACKOFF_S = 5.0
"""After a WAIT that timed out, writes to that node go without WAIT for this long."""


@dataclass(frozen=True)
class WaitPolicy:
    """``WAIT replicas timeout_ms`` after every durable write (see the module docstring)."""

    replicas: int
    timeout_ms: int


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: what :func:`connect` builds a client for."""

    kind: str  # "single", "sentinel" or "cluster"
    url: str  # for "single": the URL redis-py parses (wait options removed)
    nodes: tuple[tuple[str, int], ...] = ()  # Sentinels or Cluster seed nodes
    service: str = ""  # Sentinel service (master) name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: tuple[tuple[str, str], ...] = ()
    wait: WaitPolicy | None = None

    def option(self, name: str, default: str = "") -> str:
        return dict(self.options).get(name, default)


def _retry(cls: Any = Retry) -> Any:
    retries, total = 0, 0.0
    while total < FAILOVER_RETRY_S:
        retries += 1
        total += min(_RETRY_CAP_S, _RETRY_BASE_S * 2**retries)
    return cls(ExponentialBackoff(cap=_RETRY_CAP_S, base=_RETRY_BASE_S), retries)


def _int_option(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"Redis URL option {name}={raw!r}: expected an integer >= {minimum}.")
    return value


def _split_wait(query: dict[str, list[str]]) -> WaitPolicy | None:
    replicas = query.pop("wait_replicas", ["0"])[-1]
    timeout = query.pop("wait_timeout_ms", ["1000"])[-1]
    n = _int_option("wait_replicas", replicas, 0)
    t = _int_option("wait_timeout_ms", timeout, 1)
    return WaitPolicy(n, t) if n else None


def _hosts(text: str, url: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for part in text.split(","):
        part = part.strip()
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = part.rpartition(":")
        if not host or not port_text.isdigit():
            raise ConfigError(f"Redis URL {redact(url)}: {part!r} is not HOST:PORT.")
        nodes.append((host, int(port_text)))
    return tuple(nodes)


def parse_url(url: str) -> RedisTarget:
    """Parse a Redis URL (see the module docstring); raises ConfigError with what is wrong."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"Not a Redis URL: {redact(str(url))!r} (expected redis://, redis+sentinel://, ...)."
        )
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    rest, _, query_text = rest.partition("?")
    query = parse_qs(query_text, keep_blank_values=True)
    wait = _split_wait(query)
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"Unknown Redis URL scheme {scheme!r} in {redact(url)}: use redis://, rediss://, unix://, "
                "redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://."
            )
        kept = "&".join(f"{k}={v}" for k, vs in query.items() for v in vs)
        return RedisTarget("single", f"{scheme}://{rest}" + (f"?{kept}" if kept else ""), wait=wait)
    unknown = sorted(set(query) - _KNOWN_OPTIONS)
    if unknown:
        raise ConfigError(f"Redis URL {redact(url)}: unknown option(s) {', '.join(unknown)}.")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    nodes = _hosts(netloc, url)
    options = tuple((k, vs[-1]) for k, vs in sorted(query.items()))
    tls = scheme.startswith("rediss")
    if scheme in CLUSTER_SCHEMES:
        if path.strip("/"):
            raise ConfigError(f"Redis URL {redact(url)}: a Cluster has no database number or service name.")
        return RedisTarget("cluster", url, nodes, "", 0, username, password, tls, options, wait)
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ConfigError(
            f"Redis URL {redact(url)}: expected redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]."
        )
    db = _int_option("db", parts[1], 0) if len(parts) == 2 else 0
    return RedisTarget("sentinel", url, nodes, unquote(parts[0]), db, username, password, tls, options, wait)


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and errors)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if has_password else f"{user}@{hosts}"
    tail_text = slash + tail
    if "password=" in tail_text:
        head, _, q = tail_text.partition("?")
        q = "&".join(f"{k.split('=')[0]}=***" if "password" in k.split("=")[0] else k for k in q.split("&"))
        tail_text = f"{head}?{q}"
    return f"{scheme}://{netloc}{tail_text}"


def _tls_kwargs(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    kw: dict[str, Any] = {"ssl": True}
    for name in _TLS_OPTIONS:
        if target.option(name):
            kw[name] = target.option(name)
    return kw


class SentinelRedis(redis.Redis):
    """The client of a Sentinel-managed primary: ``close()`` also closes its Sentinel connections
    (redis-py leaves them open, and they would leak one socket per Sentinel per client)."""

    def close(self) -> None:
        super().close()
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", []):
            sentinel.close()


@dataclass(frozen=True)
class _Flavour:
    """The classes of one redis-py flavour (blocking or asyncio)."""

    redis: Any
    sentinel: Any
    cluster: Any
    node: Any
    retry: Any
    sentinel_client: Any


_BLOCKING = _Flavour(redis.Redis, Sentinel, RedisCluster, ClusterNode, Retry, SentinelRedis)


def _asyncio_flavour() -> _Flavour:
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.asyncio.retry
    import redis.asyncio.sentinel

    class AsyncSentinelRedis(redis.asyncio.Redis):
        """Like :class:`SentinelRedis`: ``aclose()`` also closes the Sentinel connections."""

        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            await super().aclose(close_connection_pool)
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", []):
                await sentinel.aclose()

    return _Flavour(
        redis.asyncio.Redis,
        redis.asyncio.sentinel.Sentinel,
        redis.asyncio.cluster.RedisCluster,
        redis.asyncio.cluster.ClusterNode,
        redis.asyncio.retry.Retry,
        AsyncSentinelRedis,
    )


def _build(url: str, flavour: _Flavour, common: dict[str, Any]) -> Any:
    target = parse_url(url)
    client: Any
    if target.kind == "single":
        client = flavour.redis.from_url(target.url, **common)
    elif target.kind == "sentinel":
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": common["socket_connect_timeout"],
            "socket_connect_timeout": common["socket_connect_timeout"],
        }
        if target.option("sentinel_password"):
            sentinel_kwargs["password"] = target.option("sentinel_password")
        if target.option("sentinel_tls") in ("1", "true", "yes"):
            sentinel_kwargs.update(_tls_kwargs(target) or {"ssl": True})
        sentinel = flavour.sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
        client = sentinel.master_for(
            target.service,
            redis_class=flavour.sentinel_client,
            db=target.db,
            username=target.username,
            password=target.password,
            retry=_retry(flavour.retry),
            **common,
            **_tls_kwargs(target),
        )
    else:
        client = flavour.cluster(
            startup_nodes=[flavour.node(h, p) for h, p in target.nodes],
            username=target.username,
            password=target.password,
            retry=_retry(flavour.retry),
            **common,
            **_tls_kwargs(target),
        )
    client.midasheng_wait = target.wait
    return client


def connect(
    url: str,
    *,
    socket_timeout: float | None = 5.0,
    socket_connect_timeout: float = 5.0,
    decode_responses: bool = False,
) -> redis.Redis:
    """A client for ``url`` (see the module docstring). A Cluster URL gives a
    ``redis.cluster.RedisCluster``, which offers the same commands for keys of one slot; the
    transport (``services/transport``) makes every multi-key operation slot-safe."""
    common = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "decode_responses": decode_responses,
    }
    client: redis.Redis = _build(url, _BLOCKING, common)
    return client


def connect_async(
    url: str,
    *,
    socket_timeout: float | None = 5.0,
    socket_connect_timeout: float = 5.0,
    decode_responses: bool = False,
) -> Any:
    """The asyncio client (``redis.asyncio``) for ``url``, like :func:`connect` (the same URL forms);
    create it inside the event loop that uses it."""
    common = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "decode_responses": decode_responses,
    }
    return _build(url, _asyncio_flavour(), common)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def wait_policy(client: Any) -> WaitPolicy | None:
    """The ``wait_replicas`` policy :func:`connect` gave ``client`` (None: do not wait)."""
    policy = getattr(client, "midasheng_wait", None)
    return policy if isinstance(policy, WaitPolicy) else None


def set_wait_policy(client: Any, policy: WaitPolicy | None) -> None:
    client.midasheng_wait = policy


_warn_lock = threading.Lock()
_last_warned = 0.0
_no_wait_until: dict[str, float] = {}  # node -> monotonic time until which its writes skip WAIT


def _node_name(node: Any) -> str:
    kw = node.connection_pool.connection_kwargs
    return f"{kw.get('host')}:{kw.get('port')}" if "host" in kw else str(id(node.connection_pool))


def _unconfirmed(policy: WaitPolicy, acked: int, what: str) -> None:
    global _last_warned
    metrics.REDIS_UNREPLICATED.inc()
    with _warn_lock:
        now = time.monotonic()
        if now - _last_warned < _WARN_EVERY_S:
            return
        _last_warned = now
    log.warning(
        "%s: %d of %d replica(s) confirmed the write within %d ms; it is on the primary only for "
        "now (a crash of the primary right now could lose it), and writes to that node skip WAIT "
        "for %.0f s. Is a replica down or lagging?",
        what,
        acked,
        policy.replicas,
        policy.timeout_ms,
        UNREPLICATED_BACKOFF_S,
    )


_RETRYABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ReadOnlyError,
)


def run_script(client: Any, script: Script, keys: Sequence[str], args: Sequence[Any], what: str) -> Any:
    """Run a registered Lua ``script`` over ``keys`` (all in one slot) and return its reply; when
    the client has a ``wait_replicas`` policy, ``WAIT`` follows on the same connection.

    Without a policy this is ``script(keys, args)``. With one, the script and the WAIT go in one
    pipeline to the node that holds the keys (on a Cluster: the slot's primary, found from the
    client's slot table; a moved slot or a node that went away refreshes the table and tries again
    for up to ``FAILOVER_RETRY_S``). Scripts run here must be safe to run twice (a retried script
    may have run before the connection broke): the transport's are.
    """
    policy = wait_policy(client)
    if policy is None:
        return script(keys=list(keys), args=list(args), client=client)
    if not is_cluster(client):
        return _script_then_wait(client, script, keys, args, policy, what)
    deadline = time.monotonic() + FAILOVER_RETRY_S
    attempt = 0
    while True:
        attempt += 1
        try:
            node = client.get_node_from_key(keys[0])
            return _script_then_wait(client.get_redis_connection(node), script, keys, args, policy, what)
        except _RETRYABLE as e:
            if time.monotonic() > deadline:
                raise
            log.info("%s: %s (attempt %d); refreshing the cluster's slot table", what, e, attempt)
            time.sleep(min(_RETRY_CAP_S, _RETRY_BASE_S * 2**attempt))
            try:
                client.nodes_manager.initialize()
            except redis.RedisError as refresh_error:
                log.info("cluster slot refresh failed: %s", refresh_error)


def _script_then_wait(
    node: redis.Redis, script: Script, keys: Sequence[str], args: Sequence[Any], policy: WaitPolicy, what: str
) -> Any:
    name = _node_name(node)
    if time.monotonic() < _no_wait_until.get(name, 0.0):  # no replica confirmed lately: do not wait
        reply = script(keys=list(keys), args=list(args), client=node)
        _unconfirmed(policy, 0, what)
        return reply

    def once() -> Any:
        pipe = node.pipeline(transaction=False)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", policy.replicas, policy.timeout_ms)
        return pipe.execute()

    try:
        reply, acked = once()
    except redis.exceptions.NoScriptError:  # not run: load it on this node and run it
        node.script_load(script.script)
        reply, acked = once()
    if int(acked) < policy.replicas:
        _no_wait_until[name] = time.monotonic() + UNREPLICATED_BACKOFF_S
        _unconfirmed(policy, int(acked), what)
    else:
        _no_wait_until.pop(name, None)
    return reply


def slot_groups(client: Any, keys: Sequence[str]) -> list[list[str]]:
    """``keys`` grouped so that each group may go into one multi-key command: one group on a
    single server, one per hash slot on a Cluster (in first-seen order)."""
    if not is_cluster(client):
        return [list(keys)] if keys else []
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(client.keyslot(key), []).append(key)
    return list(groups.values())
