"""Redis beyond one node: a live stream end to end on a real 3-primary Redis Cluster and on a
Sentinel group, with the primary that holds the session's keys killed (SIGKILL) mid-stream.

The stack (encoder, two LM worker loops, gateway, in-process) reaches Redis through the URL alone
(``redis+cluster://`` / ``redis+sentinel://`` with ``wait_replicas=1``). A crash failover must lose
no final caption and show none twice: every caption write and token publication was confirmed by
the replica that the failover promotes, the clients retry through the election, and LM workers
whose leases lapsed meanwhile take their sessions back from what Redis holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from encoder_service.server import EncoderServer, start_encoder_server
from lm_service.engines.base import CaptionEngine
from lm_service.server import LMServer, start_lm_server
from services.gateway.server import GatewayServer, start_gateway
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2_grpc
from services.training.synth import types_in_caption
from services.transport import keys
from services.transport.connect import connect
from services.transport.redis_server import (
    PrivateCluster,
    PrivateRedis,
    PrivateSentinel,
    start_private_cluster,
    start_private_sentinel,
)
from tests.e2e.helpers import Collected, clip, paced

PARTS = [("high_tone", 10.0), ("white_noise", 10.0), ("low_tone", 10.0)]
WAIT = "?wait_replicas=1&wait_timeout_ms=2000"


@dataclass
class Stack:
    encoder: EncoderServer
    lm: LMServer
    gateway: GatewayServer
    channel: grpc.Channel

    @property
    def stub(self) -> captions_pb2_grpc.CaptionServiceStub:
        return captions_pb2_grpc.CaptionServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.gateway.stop(grace=1.0)
        self.lm.stop(grace=1.0)
        self.encoder.stop(grace=1.0)


def start_stack(url: str, engine: CaptionEngine, encoder_model: MiDashengLM) -> Stack:
    enc = start_encoder_server(encoder_model, url)
    lm = start_lm_server(engine, url, workers=2, worker_prefix="ha")
    gw = start_gateway(url, f"127.0.0.1:{enc.port}", f"127.0.0.1:{lm.port}")
    return Stack(enc, lm, gw, grpc.insecure_channel(f"127.0.0.1:{gw.port}"))


def stream_and_crash(stack: Stack, crash: Callable[[str], None]) -> tuple[Collected, float]:
    """Stream the clip; once 3 captions arrived, crash the session's primary (``crash(sid)``)."""
    res = Collected()
    crashed_at = 0.0
    for resp in stack.stub.StreamCaptions(paced(clip(PARTS, seed=3)), timeout=180):
        res.responses.append(resp)
        if not crashed_at and len(res.captions) >= 3:
            crash(res.started.session_id)
            crashed_at = time.monotonic()
    assert crashed_at, "the stream ended before the crash\n" + res.table()
    return res, crashed_at


def check_nothing_lost_or_twice(res: Collected) -> None:
    kinds = res.kinds()
    assert kinds[0] == "started" and kinds[-1] == "ended", res.table()
    assert res.ended.total_audio_seconds == pytest.approx(30.0, abs=0.05), res.table()
    assert not [e for e in res.errors if e.fatal], res.table()
    pairs = [(c.segment_id, c.revision) for c in res.captions]
    assert len(pairs) == len(set(pairs)), "a (segment, revision) was shown twice\n" + res.table()
    finals = res.finals
    assert [(c.segment_id, c.window_start_seconds, c.window_end_seconds) for c in finals] == [
        (0, 0.0, 10.0),
        (1, 10.0, 20.0),
        (2, 20.0, 30.0),
    ], res.table()
    for c, (name, _) in zip(finals, PARTS, strict=True):
        assert set(types_in_caption(c.text)) == {name}, f"segment {c.segment_id}: {c.text!r}\n{res.table()}"


def stored_finals(url: str, sid: str) -> list[tuple[str, str]]:
    client = connect(url)
    try:
        entries = client.xrange(keys.session_captions(sid))
    finally:
        client.close()
    return [
        (f[b"segment_id"].decode(), f[b"text"].decode())
        for _, f in entries
        if f.get(b"type", b"caption") == b"caption" and f.get(b"is_final") == b"1"
    ]


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    c = start_private_cluster(primaries=3, replicas=1, node_timeout_ms=1000)
    yield c
    c.stop()


@pytest.fixture
def sentinel() -> Iterator[PrivateSentinel]:
    s = start_private_sentinel(replicas=1, sentinels=3, down_after_ms=1000)
    yield s
    s.stop()


@pytest.mark.slow
def test_cluster_primary_crash_mid_stream_loses_no_final_caption(
    cluster: PrivateCluster, engine: CaptionEngine, encoder_model: MiDashengLM
) -> None:
    url = cluster.url + WAIT
    stack = start_stack(url, engine, encoder_model)
    victim: list[PrivateRedis] = []

    def crash(sid: str) -> None:
        node = cluster.node_for(keys.session_tokens(sid))
        victim.append(node)
        node.kill()

    try:
        res, _ = stream_and_crash(stack, crash)
    finally:
        stack.stop()
    check_nothing_lost_or_twice(res)
    sid = res.started.session_id
    promoted = cluster.node_for(keys.session_tokens(sid))
    assert promoted is not victim[0] and not victim[0].alive()
    # What the client saw is what the promoted replica holds: nothing acknowledged was lost.
    assert [(str(c.segment_id), c.text) for c in res.finals] == stored_finals(url, sid)


@pytest.mark.slow
def test_sentinel_primary_crash_mid_stream_loses_no_final_caption(
    sentinel: PrivateSentinel, engine: CaptionEngine, encoder_model: MiDashengLM
) -> None:
    url = sentinel.url + WAIT
    stack = start_stack(url, engine, encoder_model)
    old = sentinel.primary()

    def crash(sid: str) -> None:
        old.kill()

    try:
        res, _ = stream_and_crash(stack, crash)
    finally:
        stack.stop()
    check_nothing_lost_or_twice(res)
    new = sentinel.wait_failover(old)
    assert new is not old
    sid = res.started.session_id
    assert [(str(c.segment_id), c.text) for c in res.finals] == stored_finals(url, sid)
