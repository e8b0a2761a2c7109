"""Fault injection mid-stream, with the faulty tier a real OS process so that the signal is real:
SIGSTOP/SIGCONT of the encoder and of the LM lease holder (past its lease), SIGKILL of the gateway
under the client library, and a restart of a persistent Redis. Each case checks that the session's
finals come out in order, every segment exactly once, and that the session continues or ends with
a clear error (never silently dead).

Covered elsewhere, not repeated here: SIGKILL of the LM lease holder (tests/e2e/test_takeover.py),
an encoder that goes away (tests/e2e/test_encoder_outage.py), ``up`` restarting a crashed child
(tests/e2e/test_up_supervised.py), a graceful gateway restart under the client library
(tests/e2e/test_client_library.py), SIGKILL of a training worker mid-job: taken over, resumed from
its checkpoint (tests/jobs/test_worker.py::test_killed_worker_is_taken_over_and_the_job_resumes_from_its_checkpoint).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from encoder_service.server import start_encoder_server
from lm_service.engines.base import CaptionEngine
from lm_service.server import start_lm_server
from services.client import CaptionClient, ClientLimits
from services.gateway.server import start_gateway
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc
from services.transport import keys
from services.transport.lease import Lease
from services.transport.redis_server import PrivateRedis, free_port, start_private_redis
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    CHUNK,
    SPEED,
    SR,
    Collected,
    Feeder,
    Tier,
    audio_req,
    clip,
    config,
    paced,
    pcm_chunks,
    remember,
)
from tests.e2e.test_client_library import check_exactly_once

pytestmark = pytest.mark.slow

PARTS = [("high_tone", 10.0), ("white_noise", 10.0), ("low_tone", 10.0)]
STALL_S = 4.0  # how long the encoder stays stopped
EVENT_BOUND_S = 30.0  # a live stream gets an event or its end within this after a fault is over


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[Callable[..., Tier]]:
    """Factory: ``tiers(name, *args)`` starts a tier process (not waited for); all stopped at teardown."""
    started: list[Tier] = []

    def make(name: str, *args: str) -> Tier:
        t = Tier(name, args, tmp_path / f"{name}.log")
        started.append(t)
        return t

    yield make
    for t in reversed(started):
        t.stop()


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return clip(PARTS, seed=11)


def check_finals(res: Collected, seconds: float) -> None:
    """Finals in order, each segment exactly once and none missing; no (segment, revision) or
    event shown twice; revisions of a segment count up without a gap."""
    finals = res.finals
    ids = [c.segment_id for c in finals]
    assert ids == list(range(int(seconds // 10))), "a final missing or repeated\n" + res.table()
    assert [(c.window_start_seconds, c.window_end_seconds) for c in finals] == [
        (10.0 * k, 10.0 * (k + 1)) for k in ids
    ], res.table()
    pairs = [(c.segment_id, c.revision) for c in res.captions]
    assert len(pairs) == len(set(pairs)), "a (segment, revision) was shown twice\n" + res.table()
    events = [c.event_id for c in res.captions]
    assert len(events) == len(set(events)), res.table()
    for seg in set(c.segment_id for c in res.captions):
        revs = [c.revision for c in res.captions if c.segment_id == seg]
        assert revs == list(range(len(revs))), res.table()


def stream_with_fault(
    stub: captions_pb2_grpc.CaptionServiceStub,
    audio: np.ndarray,
    fault: Callable[[str], None],
    after_captions: int = 2,
) -> tuple[Collected, list[float], float]:
    """Stream ``audio`` paced; after ``after_captions`` captions run ``fault(session_id)`` in a
    thread. Returns the responses, the gaps (s) between consecutive responses and when (monotonic)
    the call ended."""
    res = Collected()
    gaps: list[float] = []
    thread: threading.Thread | None = None
    call = stub.StreamCaptions(paced(audio), timeout=150)
    last = time.monotonic()
    try:
        for resp in call:
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            res.responses.append(remember(resp))
            if thread is None and len(res.captions) >= after_captions:
                thread = threading.Thread(target=fault, args=(res.started.session_id,), daemon=True)
                thread.start()
    except grpc.RpcError as e:
        res.error = e
    ended_at = time.monotonic()
    assert thread is not None, "no caption before the fault\n" + res.table()
    thread.join(60)
    assert not thread.is_alive()
    return res, gaps, ended_at


# --- SIGSTOP / SIGCONT --------------------------------------------------------------------------


def resume_rest(
    stub: captions_pb2_grpc.CaptionServiceStub, sid: str, after_event_id: str, audio: np.ndarray
) -> Collected:
    """Resume ``sid`` after ``after_event_id``, send the audio from SessionStarted.last_seq + 1 and
    half-close; the whole call."""
    feeder = Feeder()
    feeder.put(config(session_id=sid, resume_after_event_id=after_event_id))
    call = stub.StreamCaptions(iter(feeder), timeout=120)
    res = Collected()
    try:
        res.responses.append(next(call))
        started = res.started
        assert started.resumed, started
        feeder.put(
            *[audio_req(d, i + 1) for i, d in enumerate(pcm_chunks(audio)) if i + 1 > started.last_seq]
        )
        feeder.close()
        for resp in call:
            res.responses.append(resp)
    except grpc.RpcError as e:
        res.error = e
    finally:
        feeder.close()
    return res


@pytest.mark.parametrize("call_timeout_s", [None, 2.0], ids=["within-the-call-timeout", "past-it"])
def test_sigstop_of_the_encoder_mid_stream_stalls_the_session_or_ends_it_resumably(
    tiers: Callable[..., Tier],
    redis_url: str,
    engine: CaptionEngine,
    audio: np.ndarray,
    call_timeout_s: float | None,
) -> None:
    """The encoder is stopped for 4 s: shorter than the gateway's encoder call timeout (30 s),
    or, with that timeout set to 2 s, longer."""
    enc = tiers("encoder", "encoder", "--listen", "127.0.0.1:0", "--redis-url", redis_url, "--device", "cpu")
    lm = start_lm_server(engine, redis_url, workers=1, worker_prefix="lm")
    enc.wait_ready()
    gw = start_gateway(redis_url, enc.target, f"127.0.0.1:{lm.port}")
    if call_timeout_s is not None:
        gw.encoder.timeout = call_timeout_s
    stopped = threading.Event()

    def fault(_sid: str) -> None:
        enc.signal(signal.SIGSTOP)
        stopped.set()
        time.sleep(STALL_S)  # the fault lasts this long
        enc.signal(signal.SIGCONT)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            stub = captions_pb2_grpc.CaptionServiceStub(ch)
            res, gaps, _ = stream_with_fault(stub, audio, fault)
            if call_timeout_s is None:
                whole = res
            else:
                # Measured: the stream ends with UNAVAILABLE saying the session can be resumed.
                assert res.error is not None, "the stream went on past the call timeout\n" + res.table()
                assert res.error.code() == grpc.StatusCode.UNAVAILABLE, res.error.details()
                details = res.error.details() or ""
                assert "encoder service did not answer" in details and "can be resumed" in details, details
                sid = res.started.session_id
                last = res.captions[-1].event_id
                rest = resume_rest(stub, sid, last, audio)  # the encoder is awake again
                assert rest.error is None, f"{rest.error}\n{rest.table()}"
                whole = Collected(res.responses + rest.responses)
    finally:
        gw.stop(grace=1.0)
        lm.stop(grace=1.0)
    assert stopped.is_set()
    # Measured: the gateway waits for the encoder (or the session is resumed); nothing is lost
    # or shown twice, the session ends normally.
    assert not whole.errors, whole.table()
    assert whole.ended.reason == captions_pb2.SessionEnded.CLIENT_CLOSED
    assert whole.ended.total_audio_seconds == pytest.approx(30.0, abs=0.05), whole.table()
    if call_timeout_s is None:
        assert max(gaps) >= STALL_S * 0.5, f"the stop did not stall the stream: {max(gaps):.1f} s"
    assert max(gaps) < STALL_S + EVENT_BOUND_S
    check_finals(whole, 30.0)


@pytest.mark.parametrize("workers", [2, 1], ids=["another-worker", "the-same-worker"])
def test_sigstop_of_the_lm_lease_holder_past_its_lease_hands_the_session_over_without_duplicates(
    make_stack: Callable[..., LiveStack],
    tiers: Callable[..., Tier],
    redis_url: str,
    audio: np.ndarray,
    workers: int,
) -> None:
    """The lease holder is stopped until its lease is gone: with two LM processes until the other
    one holds it, with one until it expired. Then it wakes up with its work in flight."""
    lms = {
        wid: tiers(
            wid,
            "lm",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            redis_url,
            "--workers",
            "1",
            "--worker-id",
            wid,
            "--device",
            "cpu",
        )
        for wid in ("lmA", "lmB")[:workers]
    }
    for t in lms.values():
        t.wait_ready()
    stack = make_stack(lm_workers=-1)  # the LM processes serve the session
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    lease = Lease(client)
    owners: list[str | None] = []
    frozen: list[Tier] = []

    def fault(sid: str) -> None:
        owner = lease.owner(keys.session_lease(sid))
        assert owner is not None, "a live session must be leased"
        owners.append(owner)
        frozen.append(lms[owner.split("-")[0]])
        frozen[0].signal(signal.SIGSTOP)
        deadline = time.monotonic() + EVENT_BOUND_S
        try:  # stopped until another worker holds the lease, or (alone) until it expired
            while time.monotonic() < deadline:
                now = lease.owner(keys.session_lease(sid))
                if now != owner and (now is not None or workers == 1):
                    owners.append(now)
                    break
                time.sleep(0.1)
        finally:
            frozen[0].signal(signal.SIGCONT)  # the old holder wakes up with work in flight

    try:
        res, gaps, _ = stream_with_fault(stack.stub, audio, fault, after_captions=3)
    finally:
        client.close()
    assert len(owners) == 2, f"the lease did not move while its holder was stopped: {owners}"
    if workers == 2:
        assert owners[1] is not None and owners[1].split("-")[0] != frozen[0].name, owners
    assert all(t.proc.poll() is None for t in lms.values()), "a worker died"
    woken = frozen[0].log.read_text()
    assert "was taken over; dropping it" in woken, woken[-2000:]  # it noticed, and let go
    if workers == 1:  # then adopted its own session again
        assert "took over session" in woken.split("dropping it", 1)[1], woken[-2000:]
    # Measured: another worker (or the woken one, alone) takes the session over; the woken holder
    # is fenced off; the session goes on and ends normally.
    assert res.error is None, f"{res.error}\n{res.table()}"
    assert not [e for e in res.errors if e.fatal], res.table()
    assert res.ended.reason == captions_pb2.SessionEnded.CLIENT_CLOSED
    assert res.ended.total_audio_seconds == pytest.approx(30.0, abs=0.05), res.table()
    assert max(gaps) < EVENT_BOUND_S
    check_finals(res, 30.0)


# --- SIGKILL of the gateway under the client library --------------------------------------------


def test_sigkill_of_the_gateway_is_ridden_out_by_the_client_library_exactly_once(
    tiers: Callable[..., Tier],
    redis_url: str,
    engine: CaptionEngine,
    encoder_model: MiDashengLM,
) -> None:
    audio = clip([("high_tone", 10.0), ("white_noise", 10.0)], seed=4)
    enc = start_encoder_server(encoder_model, redis_url)
    lm = start_lm_server(engine, redis_url, workers=1, worker_prefix="lm")
    port = free_port()
    args = [
        "gateway",
        "--listen",
        f"127.0.0.1:{port}",
        "--redis-url",
        redis_url,
        "--encoder",
        f"127.0.0.1:{enc.port}",
        "--lm",
        f"127.0.0.1:{lm.port}",
    ]
    gateways = [tiers("gateway1", *args).wait_ready()]
    limits = ClientLimits(reconnect_seconds=60.0, backoff_base_seconds=0.1, backoff_cap_seconds=0.5)
    chunks = pcm_chunks(audio)
    events: list[object] = []
    first_caption = threading.Event()
    try:
        with CaptionClient(f"127.0.0.1:{port}", limits=limits) as client:
            stream = client.stream(sample_rate_hz=SR, interim_results=True)

            def feed() -> None:
                for i, c in enumerate(chunks):
                    if i == 80:  # 8 s of 20 s
                        first_caption.wait(60)
                        gateways[0].signal(signal.SIGKILL)
                        gateways[0].proc.wait(timeout=10)
                        gateways.append(tiers("gateway2", *args))  # same port
                    stream.send(c)
                stream.finalize()

            feeder = threading.Thread(target=feed)
            feeder.start()
            for ev in stream.events(timeout=150):
                events.append(ev)
                if isinstance(ev, captions_pb2.CaptionEvent):
                    first_caption.set()
            feeder.join(30)
            stream.close()
            assert gateways[0].proc.returncode == -signal.SIGKILL
            assert len(gateways) == 2 and gateways[1].ready.is_set()
            assert stream.reconnects.count >= 1
            assert stream.state.started is not None and stream.state.started.resumed
            check_exactly_once(redis_url, stream.session_id, events)
    finally:
        lm.stop(grace=1.0)
        enc.stop(grace=1.0)


# --- Redis restart with persistence -------------------------------------------------------------

REDIS_DOWN_S = 3.0  # the restart's downtime: stopped (SIGTERM), then started again this much later


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = start_private_redis(workdir=tmp_path / "redis", persist=True)
    yield server
    server.stop(keep_dir=True)


def test_a_restart_of_a_persistent_redis_mid_stream_ends_raw_streams_resumably_and_the_client_resumes(
    persistent_redis: PrivateRedis, engine: CaptionEngine, encoder_model: MiDashengLM, audio: np.ndarray
) -> None:
    """Two sessions live through the restart: a raw gRPC stream (what a bare client sees) and a
    client-library stream (which resumes on its own). The library's reconnects during the outage
    must be answered UNAVAILABLE (retried), not INTERNAL (final): before services/rpc.py mapped
    Redis connection errors, the library stream failed here with 'internal error (ConnectionError)'."""
    url = persistent_redis.url
    enc = start_encoder_server(encoder_model, url)
    lm = start_lm_server(engine, url, workers=1, worker_prefix="lm")
    gw = start_gateway(url, f"127.0.0.1:{enc.port}", f"127.0.0.1:{lm.port}")
    target = f"127.0.0.1:{gw.port}"
    lib_audio = clip([("high_tone", 10.0), ("white_noise", 10.0)], seed=4)
    lib_caption = threading.Event()
    down_at: list[float] = []
    lib_events: list[object] = []
    lib_result: dict[str, object] = {}

    def fault(_sid: str) -> None:
        assert lib_caption.wait(60), "the library stream got no caption"
        persistent_redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        down_at.append(time.monotonic())
        time.sleep(REDIS_DOWN_S)  # the fault lasts this long
        persistent_redis.restart()  # same port, directory and options: the data is back

    def library_stream() -> None:
        limits = ClientLimits(reconnect_seconds=60.0, backoff_base_seconds=0.1, backoff_cap_seconds=0.5)
        with CaptionClient(target, limits=limits) as client:
            stream = client.stream(sample_rate_hz=SR, interim_results=True)

            def feed() -> None:
                start = time.monotonic()
                for i, c in enumerate(pcm_chunks(lib_audio)):
                    delay = start + i * CHUNK / SR / SPEED - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    stream.send(c)
                stream.finalize()

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            for ev in stream.events(timeout=150):
                lib_events.append(ev)
                if isinstance(ev, captions_pb2.CaptionEvent):
                    lib_caption.set()
            feeder.join(30)
            stream.close()
            lib_result.update(sid=stream.session_id, reconnects=stream.reconnects.count)

    def library_stream_kept() -> None:
        try:
            library_stream()
        except Exception as e:  # reported below, with the events it got
            lib_result["error"] = e

    lib = threading.Thread(target=library_stream_kept, daemon=True)
    lib.start()
    try:
        with grpc.insecure_channel(target) as ch:
            res, gaps, errored_at = stream_with_fault(captions_pb2_grpc.CaptionServiceStub(ch), audio, fault)
        lib.join(150)
        assert not lib.is_alive(), "the library stream never ended"
    finally:
        gw.stop(grace=1.0)
        lm.stop(grace=1.0)
        enc.stop(grace=1.0)
    assert down_at, "redis was not restarted"
    assert max(gaps) < EVENT_BOUND_S, f"silent for {max(gaps):.1f} s\n{res.table()}"
    # Measured: the raw stream ends with UNAVAILABLE that says the session can be resumed, soon
    # after Redis went away; no final was shown twice before that.
    assert res.error is not None, "the raw stream went on through the outage\n" + res.table()
    assert res.error.code() == grpc.StatusCode.UNAVAILABLE, f"{res.error.code()}: {res.error.details()}"
    assert "can be resumed" in (res.error.details() or ""), res.error.details()
    assert errored_at - down_at[0] < REDIS_DOWN_S, "the error came only after Redis was back"
    pairs = [(c.segment_id, c.revision) for c in res.captions]
    assert len(pairs) == len(set(pairs)), "a (segment, revision) was shown twice\n" + res.table()
    finals = [c.segment_id for c in res.finals]
    assert finals == list(range(len(finals))), "a final missing, repeated or out of order\n" + res.table()
    # The library stream resumed the same session once Redis was back: every event once, in order.
    assert "error" not in lib_result, f"the library stream failed: {lib_result['error']!r}"
    assert int(lib_result["reconnects"]) >= 1  # type: ignore[call-overload]
    check_exactly_once(url, str(lib_result["sid"]), lib_events)
