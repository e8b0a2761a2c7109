"""H3 and M2: the gateway is sized for its documented sessions and no one client can take it.
Streams beyond capacity (even ones that never send a message) are refused at once with a retry
hint while health checks still answer; streams per address and per tenant, audio faster than
real time, keep-alive-only sessions, WebRTC offers per address and media sections per offer are
all bounded, each with RESOURCE_EXHAUSTED (HTTP 503 + Retry-After) or INVALID_ARGUMENT."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.errors import InvalidArgument, ResourceExhausted
from services.gateway.live import GatewayLimits
from services.gateway.quotas import RateLimit, peer_host
from services.gateway.webrtc import check_media_sections
from services.rpc import RETRY_AFTER_MS
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import CALL_TIMEOUT_S, Feeder, audio_req, clip, collect, config, pcm_chunks
from tests.security.conftest import Keys, SecureStack


def silent_streams(stack: LiveStack, n: int) -> tuple[list[grpc.Future], threading.Event]:
    """``n`` streams that never send a message (each holds a gateway thread while it waits)."""
    stop = threading.Event()

    def nothing() -> Iterator[object]:
        stop.wait(30)
        return
        yield

    calls = [stack.stub.StreamCaptions(nothing(), timeout=30) for _ in range(n)]
    return calls, stop


def refused(res: object) -> tuple[grpc.StatusCode, str, str]:
    e = res.error  # type: ignore[attr-defined]
    assert e is not None, res.table()  # type: ignore[attr-defined]
    return e.code(), e.details(), dict(e.trailing_metadata() or ()).get(RETRY_AFTER_MS, "")


def test_streams_beyond_capacity_are_refused_at_once_and_health_still_answers(
    make_stack: Callable[..., LiveStack],
) -> None:
    stack = make_stack(limits=GatewayLimits(max_sessions=4, max_streams_per_address=0))
    calls, stop = silent_streams(stack, 4)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        res = collect(stack.stub.StreamCaptions(iter([config()]), timeout=CALL_TIMEOUT_S))
        code, details, retry = refused(res)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry == "5000", details
        assert time.monotonic() - t0 < 2.0  # at once, not after a timeout
        with grpc.insecure_channel(stack.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(20):
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
    finally:
        stop.set()
        for c in calls:
            c.cancel()


def test_streams_per_address_and_per_tenant_are_bounded(
    make_stack: Callable[..., LiveStack], make_secure_stack: Callable[..., SecureStack], keys: Keys
) -> None:
    stack = make_stack(limits=GatewayLimits(max_streams_per_address=2))
    calls, stop = silent_streams(stack, 2)
    try:
        time.sleep(0.5)
        code, details, retry = refused(
            collect(stack.stub.StreamCaptions(iter([config()]), timeout=CALL_TIMEOUT_S))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "address" in details and retry, details
    finally:
        stop.set()
        for c in calls:
            c.cancel()
    time.sleep(0.5)  # the slots come back when the calls end
    assert collect(stack.stub.StreamCaptions(iter([config()]), timeout=CALL_TIMEOUT_S)).error is None

    secure = make_secure_stack(mtls=False, limits=GatewayLimits(max_streams_per_tenant=1))
    alice, bob = secure.stub(keys.key["alice"]), secure.stub(keys.key["bob"])
    held = Feeder()
    held.put(config())
    call = alice.StreamCaptions(iter(held), timeout=30)
    assert next(call).WhichOneof("response") == "started"
    code, details, _ = refused(collect(alice.StreamCaptions(iter([config()]), timeout=CALL_TIMEOUT_S)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant" in details, details
    assert collect(bob.StreamCaptions(iter([config()]), timeout=CALL_TIMEOUT_S)).error is None
    held.close()
    collect(call)


def test_audio_faster_than_real_time_is_refused_with_a_retry_hint(
    make_stack: Callable[..., LiveStack],
) -> None:
    stack = make_stack(limits=GatewayLimits(max_realtime_factor=1.0, realtime_burst_seconds=2.0))
    chunks = pcm_chunks(clip([("white_noise", 6.0)]))
    reqs = [config(), *[audio_req(d, i + 1) for i, d in enumerate(chunks)]]
    res = collect(stack.stub.StreamCaptions(iter(reqs), timeout=CALL_TIMEOUT_S))
    code, details, retry = refused(res)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "faster than 1x real time" in details, details
    assert 0 < int(retry) <= 1000 and re.search(r"resume session \w+ and send from seq 2\d in", details), (
        details
    )
    # At real time it goes through.
    paced = make_stack(limits=GatewayLimits(max_realtime_factor=1.5, realtime_burst_seconds=1.0))

    def real_time() -> Iterator[object]:
        yield config()
        for i, d in enumerate(chunks[:20]):
            time.sleep(0.1)
            yield audio_req(d, i + 1)

    ok = collect(paced.stub.StreamCaptions(real_time(), timeout=60))
    assert ok.error is None and ok.finals, ok.table()


def test_keep_alives_do_not_hold_a_silent_session_for_ever(make_stack: Callable[..., LiveStack]) -> None:
    from services.pb.midasheng.v1 import captions_pb2

    stack = make_stack(limits=GatewayLimits(max_silence_seconds=1.5, idle_timeout_seconds=30))
    keep = captions_pb2.StreamCaptionsRequest(
        control=captions_pb2.Control(action=captions_pb2.Control.KEEP_ALIVE)
    )

    def keepalives() -> Iterator[object]:
        yield config()
        for _ in range(60):
            time.sleep(0.1)
            yield keep

    res = collect(stack.stub.StreamCaptions(keepalives(), timeout=60))
    assert any(e.reason == "IDLE_TIMEOUT" and "no audio for 2 s" in e.message for e in res.errors), (
        res.table()
    )
    assert res.ended.reason == captions_pb2.SessionEnded.IDLE_TIMEOUT


def test_offer_rate_and_media_sections_are_bounded() -> None:
    rate = RateLimit(3, "offers")
    for i in range(3):
        rate.hit("1.2.3.4", now=100.0 + i)
    rate.hit("5.6.7.8", now=102.0)  # another address has its own budget
    with pytest.raises(ResourceExhausted) as e:
        rate.hit("1.2.3.4", now=103.0)
    assert e.value.retry_after == pytest.approx(57.0)
    rate.hit("1.2.3.4", now=160.5)  # a minute later
    sec = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{i}\r\n"
    head = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    check_media_sections(head + sec.format(i=0) + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n", 3)
    with pytest.raises(InvalidArgument, match="at most 3 media sections"):
        check_media_sections(head + "".join(sec.format(i=i) for i in range(700)), 3)
    with pytest.raises(InvalidArgument):
        check_media_sections(head + sec.format(i=0) + sec.format(i=1), 3)
    assert peer_host("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("unix:/tmp/x") == "unix"


def test_calls_cancelled_before_their_first_answer_do_not_leak_session_slots(
    make_stack: Callable[..., LiveStack],
) -> None:
    """M3: a client that cancels right after its SessionConfig gets its session detached (kept for
    a resume, then reaped), not held by the gateway for ever."""
    stack = make_stack(limits=GatewayLimits(resume_retention_seconds=0.5, max_streams_per_address=0))

    def config_then_wait(stop: threading.Event) -> Iterator[object]:
        yield config()
        stop.wait(10)

    for i in range(40):
        stop = threading.Event()
        call = stack.stub.StreamCaptions(config_then_wait(stop), timeout=10)
        time.sleep(0.002 * (i % 8))
        call.cancel()
        stop.set()
    deadline = time.monotonic() + 15
    while len(stack.gateway.gateway) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(stack.gateway.gateway) == 0, "sessions of cancelled calls are still held"
    assert collect(stack.stub.StreamCaptions(iter([config()]), timeout=CALL_TIMEOUT_S)).error is None


def test_a_malformed_resume_cursor_is_invalid_not_internal(make_stack: Callable[..., LiveStack]) -> None:
    from tests.e2e.helpers import remember

    stack = make_stack()
    first = collect(stack.stub.StreamCaptions(iter([config()]), timeout=CALL_TIMEOUT_S))
    sid = remember(first.responses[0]).started.session_id
    res = collect(
        stack.stub.StreamCaptions(
            iter([config(session_id=sid, resume_after_event_id="abc")]), timeout=CALL_TIMEOUT_S
        )
    )
    assert res.error is not None and res.error.code() == grpc.StatusCode.INVALID_ARGUMENT, res.table()
