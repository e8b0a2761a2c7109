"""Private ``redis-server`` processes: one server for ``midasheng up`` and the tests, and a Redis
Cluster or a Sentinel group for the tests that prove the transport beyond one node.

Every process is a child of the caller, on a port it picked (loopback unless ``host`` says
otherwise), in a private directory, and is stopped by PID. Persistence is off unless asked for
(``persist=True``: append-only file, ``appendfsync always``, so a restart keeps every write).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.errors import MidashengError

START_TIMEOUT_S = 10.0
TOPOLOGY_TIMEOUT_S = 30.0  # a Cluster to agree on its slots / Sentinels to find each other
SENTINEL_SERVICE = "mdl"
CLUSTER_SLOTS = 16384


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cluster_node_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A free port whose cluster-bus port (+10000, the Redis default) is free too."""
    for _ in range(tries):
        port = free_port(host)
        if port > 55535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, port + 10000))
        except OSError:
            continue
        return port
    raise MidashengError(f"no free port pair (port, port + 10000) found on {host}")


def _redis_binary(binary: str = "redis-server") -> str:
    exe = shutil.which(binary)
    if exe is None:
        raise MidashengError(
            "redis-server was not found on PATH. Install it (Debian/Ubuntu: apt-get install redis-server) "
            "or point REDIS_URL at an existing Redis."
        )
    return exe


@dataclass
class PrivateRedis:
    """A redis-server child process; stopped by PID."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    _owned_dir: bool = field(default=False, repr=False)
    host: str = "127.0.0.1"
    args: tuple[str, ...] = ()
    exe: str = ""

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed (the test of a failover)."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=START_TIMEOUT_S)

    def restart(self) -> None:
        """Start the same server again (same port, directory and options) after a stop or kill."""
        if self.alive():
            raise MidashengError(f"redis-server on port {self.port} is still running")
        self.process = _spawn(list(self.args), self.workdir)
        _wait_ping(self)

    def stop(self, timeout: float = 5.0, keep_dir: bool = False) -> None:
        """SIGTERM (Redis saves what persistence asks for and exits), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self._owned_dir and not keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(cmd: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    """Start a server; its log (startup errors included) goes to ``workdir/redis.log``."""
    with open(workdir / "redis.log", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _log_tail(workdir: Path, n: int = 800) -> str:
    try:
        return (workdir / "redis.log").read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""


def _wait_ping(server: PrivateRedis, timeout: float = START_TIMEOUT_S) -> None:
    client = server.client(timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if server.process.poll() is not None:
                raise MidashengError(
                    f"redis-server exited with code {server.process.returncode}: {_log_tail(server.workdir)}"
                )
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                pass
            except redis.ResponseError as e:  # e.g. LOADING: answering, not serving yet
                if "LOADING" not in str(e):
                    raise
            if time.monotonic() > deadline:
                server.stop()
                raise MidashengError(
                    f"redis-server did not answer on {server.address} within {timeout:.0f} s"
                )
            time.sleep(0.02)
    finally:
        client.close()


def start_private_redis(
    port: int | None = None,
    workdir: Path | None = None,
    binary: str = "redis-server",
    *,
    host: str = "127.0.0.1",
    persist: bool = False,
    extra: Sequence[str] = (),
) -> PrivateRedis:
    """Start ``redis-server`` on ``host`` and wait until it answers PING.

    ``persist``: an append-only file with ``appendfsync always`` in ``workdir`` (a restart keeps
    every acknowledged write); otherwise no persistence at all. ``extra``: more server options.
    """
    exe = _redis_binary(binary)
    owned = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="midasheng-redis-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    durability = (
        ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        if persist
        else [
            "--save",
            "",
            "--appendonly",
            "no",
        ]
    )
    cmd = [
        exe,
        "--port",
        str(port),
        "--bind",
        host,
        *durability,
        "--dir",
        str(wd),
        "--protected-mode",
        "no" if host != "127.0.0.1" else "yes",
        "--repl-diskless-sync-delay",
        "0",  # a replica (re)syncs at once, not after 5 s
        *extra,
    ]
    proc = _spawn(cmd, wd)
    server = PrivateRedis(
        port=port, process=proc, workdir=wd, _owned_dir=owned, host=host, args=tuple(cmd), exe=exe
    )
    _wait_ping(server)
    return server


def _until(what: str, check: Callable[[], bool], timeout: float = TOPOLOGY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise MidashengError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class PrivateCluster:
    """A Redis Cluster of private servers: ``primaries`` primaries with ``replicas`` each."""

    nodes: list[PrivateRedis]
    workdir: Path

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def node_for(self, key: str, role: str = "master") -> PrivateRedis:
        """The live node that serves ``key``'s slot as ``role`` ("master" or "slave")."""
        for node in self.nodes:
            if not node.alive():
                continue
            with node.client() as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, primary, *replicas in c.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        wanted = [primary] if role == "master" else replicas
                        ports = {int(n[1]) for n in wanted}
                        return next(n for n in self.nodes if n.port in ports)
        raise MidashengError(f"no live node serves {key!r} as {role}")

    def wait_healthy(self, timeout: float = TOPOLOGY_TIMEOUT_S) -> None:
        """Until every live node says cluster_state:ok and the slots are served by live nodes."""

        def ok() -> bool:
            live = [n for n in self.nodes if n.alive()]
            for node in live:
                with node.client() as c:
                    if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                        return False
                    ports = {int(r[2][1]) for r in c.execute_command("CLUSTER", "SLOTS")}
                    if not ports <= {n.port for n in live}:
                        return False
            return True

        _until("the cluster to be healthy", ok, timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrivateCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_private_cluster(
    primaries: int = 3,
    replicas: int = 1,
    *,
    host: str = "127.0.0.1",
    node_timeout_ms: int = 1000,
    binary: str = "redis-server",
) -> PrivateCluster:
    """Start ``primaries * (1 + replicas)`` cluster-enabled servers, assign the 16384 slots evenly
    to the primaries, attach the replicas, and wait until the cluster is healthy (about a second).

    ``node_timeout_ms`` is ``cluster-node-timeout``: a primary silent that long is failed over to
    its replica (after the replicas' election, about two node timeouts in all)."""
    if primaries < 3:
        raise MidashengError("a Redis Cluster needs at least 3 primaries to fail over")
    root = Path(tempfile.mkdtemp(prefix="midasheng-cluster-"))
    nodes: list[PrivateRedis] = []
    try:
        for i in range(primaries * (1 + replicas)):
            nodes.append(
                start_private_redis(
                    cluster_node_port(host),
                    workdir=root / f"node{i}",
                    binary=binary,
                    host=host,
                    extra=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        "--cluster-replica-validity-factor",
                        "0",  # any replica may take over, however long its primary was gone
                    ],
                )
            )
        cluster = PrivateCluster(nodes, root)
        ids = []
        for node in nodes:
            with node.client() as c:
                ids.append(c.execute_command("CLUSTER", "MYID").decode())
        per = CLUSTER_SLOTS // primaries
        for i, node in enumerate(nodes[:primaries]):
            end = CLUSTER_SLOTS - 1 if i == primaries - 1 else (i + 1) * per - 1
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, end + 1))
        with nodes[0].client() as c:
            for node in nodes[1:]:
                c.execute_command("CLUSTER", "MEET", node.host, node.port)

        def all_known() -> bool:
            for node in nodes:
                with node.client() as c:
                    if len(c.execute_command("CLUSTER", "NODES").decode().strip().splitlines()) < len(nodes):
                        return False
            return True

        _until("the cluster nodes to meet", all_known)
        for r, node in enumerate(nodes[primaries:]):
            primary_id = ids[r % primaries]
            with node.client() as c:

                def sees_primary(c: redis.Redis = c, pid: str = primary_id) -> bool:
                    return pid.encode() in c.execute_command("CLUSTER", "NODES")

                _until("a replica to see its primary", sees_primary)
                c.execute_command("CLUSTER", "REPLICATE", primary_id)
        cluster.wait_healthy()

        def replicas_synced() -> bool:
            for node in nodes[primaries:]:
                with node.client() as c:
                    if c.info("replication").get("master_link_status") != "up":
                        return False
            return True

        _until("the replicas to sync", replicas_synced)
        return cluster
    except BaseException:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise


@dataclass
class PrivateSentinel:
    """A primary, its replicas and the Sentinels that watch them (service ``SENTINEL_SERVICE``)."""

    servers: list[PrivateRedis]  # servers[0] started as the primary
    sentinels: list[PrivateRedis]
    workdir: Path

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + f"/{SENTINEL_SERVICE}/0"

    def primary(self) -> PrivateRedis:
        """The server the Sentinels name as the primary now."""
        for sentinel in self.sentinels:
            if not sentinel.alive():
                continue
            with sentinel.client() as c:
                host, port = c.execute_command("SENTINEL", "get-master-addr-by-name", SENTINEL_SERVICE)
            return next(s for s in self.servers if s.port == int(port))
        raise MidashengError("no Sentinel is alive")

    def wait_failover(self, old: PrivateRedis, timeout: float = TOPOLOGY_TIMEOUT_S) -> PrivateRedis:
        """Until the Sentinels name another primary than ``old`` and it acts as one."""

        def moved() -> bool:
            new = self.primary()
            if new is old:
                return False
            with new.client() as c:
                return c.info("replication").get("role") == "master"

        _until("the Sentinels to fail over", moved, timeout)
        return self.primary()

    def stop(self) -> None:
        for s in [*self.sentinels, *self.servers]:
            s.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrivateSentinel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_private_sentinel(
    replicas: int = 1,
    sentinels: int = 3,
    *,
    host: str = "127.0.0.1",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 10000,
    binary: str = "redis-server",
) -> PrivateSentinel:
    """A primary with ``replicas`` replicas and ``sentinels`` Sentinels (quorum: a majority), all
    discovered by each other, so that a primary silent for ``down_after_ms`` is failed over."""
    root = Path(tempfile.mkdtemp(prefix="midasheng-sentinel-"))
    servers: list[PrivateRedis] = []
    watchers: list[PrivateRedis] = []
    try:
        primary = start_private_redis(workdir=root / "server0", binary=binary, host=host)
        servers.append(primary)
        for i in range(replicas):
            servers.append(
                start_private_redis(
                    workdir=root / f"server{i + 1}",
                    binary=binary,
                    host=host,
                    extra=["--replicaof", primary.host, str(primary.port)],
                )
            )
        exe = _redis_binary(binary)
        quorum = sentinels // 2 + 1
        for i in range(sentinels):
            wd = root / f"sentinel{i}"
            wd.mkdir(parents=True)
            port = free_port(host)
            conf = wd / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind {host}\ndir {wd}\nprotected-mode no\n"
                f"sentinel monitor {SENTINEL_SERVICE} {primary.host} {primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {SENTINEL_SERVICE} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n"
            )
            cmd = [exe, str(conf), "--sentinel"]
            proc = _spawn(cmd, wd)
            watcher = PrivateRedis(port, proc, wd, host=host, args=tuple(cmd), exe=exe)
            watchers.append(watcher)
            _wait_ping(watcher)
        group = PrivateSentinel(servers, watchers, root)

        def discovered() -> bool:
            for w in watchers:
                with w.client() as c:
                    if len(c.execute_command("SENTINEL", "replicas", SENTINEL_SERVICE)) < replicas:
                        return False
                    if len(c.execute_command("SENTINEL", "sentinels", SENTINEL_SERVICE)) < sentinels - 1:
                        return False
            for s in servers[1:]:
                with s.client() as c:
                    if c.info("replication").get("master_link_status") != "up":
                        return False
            return True

        _until("the Sentinels to find the replicas and each other", discovered)
        return group
    except BaseException:
        for s in [*watchers, *servers]:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
