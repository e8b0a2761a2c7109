"""The tiers across hosts: each on its own network namespace and address, joined by veth pairs on
a bridge the test makes; real ``midasheng`` processes (``ip netns exec``).

    host A: gateway        host B: encoder (reached by name, "encoder-b")
    host C: redis-server (append-only file, fsync always)
    hosts D and E: one LM worker each

- a live stream yields the same final captions as the one-host stack;
- cutting the link of the LM worker that holds the session (link down) mid-stream hands the
  session to the other worker: no caption window lost, none shown twice;
- restarting Redis mid-stream keeps the session going (or ends it with a clear error, never
  silently);
- after the encoder is restarted, the gateway reaches it again by name within seconds.

Needs root (network namespaces) and iproute2; skips and says why otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis

from services import rpc
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc
from services.training.synth import types_in_caption
from services.transport import keys
from tests.deploy.test_redis_ha import PARTS, check_nothing_lost_or_twice
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    CHUNK,
    SPEED,
    Collected,
    audio_req,
    clip,
    config,
    paced,
    pcm_chunks,
    requests_for,
)

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180.0
TOKEN = "across-hosts-" + uuid.uuid4().hex
HOSTS = {"A": 1, "B": 2, "C": 3, "D": 4, "E": 5}  # host -> last octet
BRIDGE_IP = 254


def _why_no_netns() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"mdlprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_why_no_netns()), reason=str(_why_no_netns()))]


def sh(*cmd: str) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


@dataclass
class Net:
    """A bridge in the root namespace and one namespace per host, each on its own veth pair."""

    tag: str
    subnet: str
    made: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"mdl{self.tag}{host}"

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS[host]}"

    @property
    def bridge(self) -> str:
        return f"mdlbr{self.tag}"

    def peer(self, host: str) -> str:
        return f"mdl{self.tag}{host}b"  # the bridge end of host's veth pair

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.made.append("bridge")
        sh("ip", "addr", "add", f"{self.subnet}.{BRIDGE_IP}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host in HOSTS:
            ns, inner = self.ns(host), f"mdl{self.tag}{host}i"
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", self.peer(host))
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", self.peer(host), "master", self.bridge)
            sh("ip", "link", "set", self.peer(host), "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip(host)}/24", "dev", inner)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            # `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts: names per host.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(
                f"127.0.0.1 localhost\n{self.ip('B')} encoder-b\n{self.ip('C')} redis-c\n"
            )

    def link(self, host: str, up: bool) -> None:
        sh("ip", "link", "set", self.peer(host), "up" if up else "down")

    def down(self) -> None:
        for host in HOSTS:
            shutil.rmtree(Path("/etc/netns") / self.ns(host), ignore_errors=True)
            if self.ns(host) in self.made:
                subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)
        if "bridge" in self.made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@dataclass
class Proc:
    name: str
    argv: list[str]
    ns: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *self.argv],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        return self

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class Hosts:
    net: Net
    procs: dict[str, Proc]
    workdir: Path

    @property
    def gateway(self) -> str:
        return f"{self.net.ip('A')}:50051"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.net.ip('C')}:6379/0"

    def stub(self) -> tuple[grpc.Channel, captions_pb2_grpc.CaptionServiceStub]:
        channel = grpc.insecure_channel(self.gateway)
        return channel, captions_pb2_grpc.CaptionServiceStub(channel)

    def wait_ready(self, name: str, target: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not rpc.wait_healthy(target, timeout=2.0):
            proc = self.procs[name].proc
            assert proc is not None and proc.poll() is None, f"{name} exited:\n{self.procs[name].tail()}"
            assert time.monotonic() < deadline, f"{name} not ready:\n{self.procs[name].tail()}"


AUTH = [("authorization", f"Bearer {TOKEN}")]


def midasheng(*args: str) -> list[str]:
    return [sys.executable, "-m", "services", *args]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    tag = f"{os.getpid() % 10000:04d}"
    net = Net(tag, f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}")
    work = tmp_path_factory.mktemp("hosts")
    (work / "token").write_text(TOKEN)
    procs: dict[str, Proc] = {}
    try:
        net.up()
        redis_dir = work / "redis"
        redis_dir.mkdir()
        redis_exe = shutil.which("redis-server") or "redis-server"
        procs["redis"] = Proc(
            "redis",
            [
                redis_exe,
                "--bind",
                net.ip("C"),
                "--port",
                "6379",
                "--protected-mode",
                "no",
                "--dir",
                str(redis_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            net.ns("C"),
            work / "redis.log",
        ).start()
        url = "redis://redis-c:6379/0"  # by name, from each host's /etc/hosts
        procs["encoder"] = Proc(
            "encoder",
            midasheng("encoder", "--listen", f"{net.ip('B')}:50061", "--redis-url", url, "--device", "cpu"),
            net.ns("B"),
            work / "encoder.log",
        ).start()
        for host in ("D", "E"):
            procs[f"lm{host}"] = Proc(
                f"lm{host}",
                midasheng(
                    "lm",
                    "--listen",
                    f"{net.ip(host)}:50062",
                    "--redis-url",
                    url,
                    "--device",
                    "cpu",
                    "--workers",
                    "1",
                    "--worker-id",
                    f"lm{host}",
                ),
                net.ns(host),
                work / f"lm{host}.log",
            ).start()
        procs["gateway"] = Proc(
            "gateway",
            midasheng(
                "gateway",
                "--listen",
                f"{net.ip('A')}:50051",
                "--redis-url",
                url,
                "--encoder",
                "encoder-b:50061",
                "--lm",
                f"{net.ip('D')}:50062",
                "--token-file",
                str(work / "token"),
            ),
            net.ns("A"),
            work / "gateway.log",
        ).start()
        h = Hosts(net, procs, work)
        h.wait_ready("encoder", f"{net.ip('B')}:50061")
        h.wait_ready("lmD", f"{net.ip('D')}:50062")
        h.wait_ready("lmE", f"{net.ip('E')}:50062")
        h.wait_ready("gateway", h.gateway)
        yield h
    finally:
        for p in procs.values():
            p.signal(signal.SIGTERM)
        net.down()


def stream(
    h: Hosts,
    audio_parts: list[tuple[str, float]] = PARTS,
    seed: int = 5,
    during: Callable[[Collected], None] | None = None,
) -> Collected:
    channel, stub = h.stub()
    res = Collected()
    try:
        for resp in stub.StreamCaptions(paced(clip(audio_parts, seed=seed)), timeout=180, metadata=AUTH):
            res.responses.append(resp)
            if during is not None:
                during(res)
    except grpc.RpcError as e:
        res.error = e
    finally:
        channel.close()
    return res


def finals_of(res: Collected) -> list[tuple[int, float, float, str]]:
    return [(c.segment_id, c.window_start_seconds, c.window_end_seconds, c.text) for c in res.finals]


def test_a_stream_across_hosts_has_the_finals_of_one_host(
    hosts: Hosts, make_stack: Callable[..., LiveStack]
) -> None:
    across = stream(hosts)
    assert across.error is None, f"{across.error}\n{across.table()}"
    check_nothing_lost_or_twice(across)
    one_host = make_stack()  # encoder, LM and gateway in one process, on loopback
    local = Collected()
    for resp in one_host.stub.StreamCaptions(paced(clip(PARTS, seed=5)), timeout=180):
        local.responses.append(resp)
    assert finals_of(across) == finals_of(local), f"{across.table()}\n---\n{local.table()}"


def resuming_stream(
    h: Hosts, parts: list[tuple[str, float]], seed: int, during: Callable[[Collected], None]
) -> tuple[Collected, list[str]]:
    """Stream a clip as a careful client does: when a call fails UNAVAILABLE and says the session
    can be resumed, resume it (session_id + resume_after_event_id, audio from last_seq + 1).
    Returns every response once (the first SessionStarted, events, the end) and the errors that
    made it resume."""
    chunks = pcm_chunks(clip(parts, seed=seed))
    merged = Collected()
    resumes: list[str] = []
    sid, last_event = "", ""
    for _ in range(5):
        started = threading.Event()
        first_seq = [1]

        def requests(
            sid: str = sid,
            last_event: str = last_event,
            started: threading.Event = started,
            first_seq: list[int] = first_seq,
        ) -> Iterator[captions_pb2.StreamCaptionsRequest]:
            yield config(session_id=sid, resume_after_event_id=last_event) if sid else config()
            if not started.wait(60):
                return
            t0 = time.monotonic()
            for i, data in enumerate(chunks[first_seq[0] - 1 :]):
                delay = t0 + i * CHUNK / 16000 / SPEED - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                yield audio_req(data, first_seq[0] + i)

        channel, stub = h.stub()
        try:
            for resp in stub.StreamCaptions(requests(), timeout=180, metadata=AUTH):
                kind = resp.WhichOneof("response")
                if kind == "started":
                    first_seq[0] = resp.started.last_seq + 1 if resp.started.resumed else 1
                    sid = sid or resp.started.session_id
                    started.set()
                    if merged.responses:
                        continue
                if kind == "caption":
                    last_event = resp.caption.event_id
                merged.responses.append(resp)
                during(merged)
            return merged, resumes
        except grpc.RpcError as e:
            started.set()
            if e.code() != grpc.StatusCode.UNAVAILABLE or "can be resumed" not in (e.details() or ""):
                merged.error = e
                return merged, resumes
            resumes.append(e.details() or "")
            time.sleep(0.5)
        finally:
            channel.close()
    pytest.fail(f"still failing after {len(resumes)} resumes: {resumes}")


def test_restarting_redis_mid_stream_keeps_the_session_going(hosts: Hosts) -> None:
    """Redis restarts (SIGTERM: its append-only file is fsynced; then started again on the same
    directory). The session survives in Redis; a call that failed meanwhile says so
    (UNAVAILABLE, "can be resumed") and the resumed session loses nothing and shows nothing twice."""
    restarted = []

    def restart_redis(res: Collected) -> None:
        if not restarted and len(res.captions) >= 3:
            proc = hosts.procs["redis"]
            proc.signal(signal.SIGTERM)
            time.sleep(1.0)  # the tiers see it gone
            proc.start()
            restarted.append(time.monotonic())

    res, resumes = resuming_stream(hosts, PARTS, 7, restart_redis)
    assert restarted, "the stream ended before Redis was restarted\n" + res.table()
    assert res.error is None, f"{res.error}\n{res.table()}"
    for why in resumes:  # a failed call always says what happened and what to do
        assert "can be resumed" in why, why
    check_nothing_lost_or_twice(res)
    for c, (name, _) in zip(res.finals, PARTS, strict=True):
        assert set(types_in_caption(c.text)) == {name}, res.table()


def test_the_gateway_reaches_a_restarted_encoder_by_name_within_seconds(hosts: Hosts) -> None:
    enc = hosts.procs["encoder"]
    enc.signal(signal.SIGKILL)
    channel, stub = hosts.stub()
    try:
        with pytest.raises(grpc.RpcError) as down:  # a clear refusal while it is gone
            list(stub.StreamCaptions(requests_for(clip([("high_tone", 1.0)])), timeout=30, metadata=AUTH))
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value
        enc.start()
        hosts.wait_ready("encoder", f"{hosts.net.ip('B')}:50061")
        ready = time.monotonic()
        while True:
            res = Collected()
            try:
                for resp in stub.StreamCaptions(
                    requests_for(clip([("high_tone", 3.0)])), timeout=60, metadata=AUTH
                ):
                    res.responses.append(resp)
            except grpc.RpcError as e:
                res.error = e
            if res.error is None:
                break
            assert res.error.code() == grpc.StatusCode.UNAVAILABLE, res.error
            assert time.monotonic() - ready < 10.0, f"gateway did not reconnect: {res.error.details()}"
            time.sleep(0.2)
        assert time.monotonic() - ready < 10.0
        assert res.finals and res.kinds()[-1] == "ended", res.table()
    finally:
        channel.close()


def test_cutting_the_lease_holders_link_hands_the_session_to_the_other_worker(hosts: Hosts) -> None:
    client = redis.Redis.from_url(hosts.redis_url, socket_timeout=5)
    cut: list[str] = []

    def cut_owner(res: Collected) -> None:
        if not cut and len(res.captions) >= 3:
            owner = client.get(keys.session_lease(res.started.session_id))
            assert owner is not None, "a live session must be leased"
            host = owner.decode()[2]  # "lmD-0" -> "D"
            hosts.net.link(host, up=False)
            cut.append(host)

    try:
        res = stream(hosts, seed=6, during=cut_owner)
        assert cut, "the stream ended before the cut\n" + res.table()
        survivor = "E" if cut[0] == "D" else "D"
        owner = client.get(keys.session_lease(res.started.session_id))
        assert owner is None or owner.decode().startswith(f"lm{survivor}"), owner  # released at the end
        assert res.error is None, f"{res.error}\n{res.table()}"
        check_nothing_lost_or_twice(res)
        for c in res.captions:  # revisions of a segment keep counting up across the handover
            same = [d.revision for d in res.captions if d.segment_id == c.segment_id]
            assert same == list(range(len(same))), res.table()
    finally:
        for host in cut:
            hosts.net.link(host, up=True)
        client.close()
