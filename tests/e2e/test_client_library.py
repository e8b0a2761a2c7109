"""The client library (services.client) on a real stack: a gateway restart mid-stream loses and
repeats nothing (checked against the session's caption stream in Redis), blocking and asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from services.audio.io import write_wav
from services.client import AsyncCaptionClient, CaptionClient, ClientLimits, StreamFailed
from services.client.core import StreamState
from services.errors import FailedPrecondition
from services.examples.client_stream import stream_file
from services.gateway.server import GatewayServer, start_gateway
from services.pb.midasheng.v1 import captions_pb2
from services.training.synth import types_in_caption
from services.transport import keys
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import clip, pcm_chunks

SR = 16000
LIMITS = ClientLimits(reconnect_seconds=30.0, backoff_base_seconds=0.1, backoff_cap_seconds=0.5)
RESTART_AFTER_CHUNKS = 80  # 8 s of 20 s


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return clip([("high_tone", 10.0), ("white_noise", 10.0)], seed=4)


class Restartable:
    """The stack's gateway, restarted on the same port on demand."""

    def __init__(self, stack: LiveStack) -> None:
        self.stack = stack
        self.port = stack.gateway.port
        self.extra: list[GatewayServer] = []

    def restart(self) -> None:
        old = self.extra[-1] if self.extra else self.stack.gateway
        old.stop(grace=0.2)
        enc = f"127.0.0.1:{self.stack.encoder.port}"
        lm = f"127.0.0.1:{self.stack.lm.port}" if self.stack.lm else None
        deadline = time.monotonic() + 10
        while True:  # the port is free again once the old server let go of it
            try:
                self.extra.append(
                    start_gateway(self.stack.redis_url, enc, lm, address=f"127.0.0.1:{self.port}")
                )
                return
            except (RuntimeError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        for gw in self.extra:
            gw.stop(grace=0.5)


@pytest.fixture
def gateway(make_stack: Callable[..., LiveStack]) -> Iterator[Restartable]:
    r = Restartable(make_stack())
    yield r
    r.stop()


def stored_events(redis_url: str, sid: str) -> list[tuple[str, dict[str, str]]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return list(client.xrange(keys.session_captions(sid)))
    finally:
        client.close()


def check_exactly_once(redis_url: str, sid: str, events: list[object]) -> None:
    """Every caption event stored for the session reached the application once, in order, and the
    audio arrived whole (20 s: two final segments of the right sounds)."""
    captions = [e for e in events if isinstance(e, captions_pb2.CaptionEvent)]
    ended = events[-1]
    assert isinstance(ended, captions_pb2.SessionEnded), events[-3:]
    assert ended.reason == captions_pb2.SessionEnded.CLIENT_CLOSED
    stored = stored_events(redis_url, sid)
    stored_captions = [(i, f) for i, f in stored if f.get("type", "caption") == "caption"]
    assert [c.event_id for c in captions] == [i for i, _ in stored_captions]
    assert [(c.segment_id, c.revision, c.text) for c in captions] == [
        (int(f["segment_id"]), int(f["revision"]), f["text"]) for _, f in stored_captions
    ]
    assert ended.total_audio_seconds == pytest.approx(20.0, abs=0.05)
    finals = [c for c in captions if c.is_final]
    assert [(c.window_start_seconds, c.window_end_seconds) for c in finals] == [(0.0, 10.0), (10.0, 20.0)]
    assert "high_tone" in types_in_caption(finals[0].text), finals
    assert "white_noise" in types_in_caption(finals[1].text), finals


def test_blocking_client_rides_out_a_gateway_restart(gateway: Restartable, audio: np.ndarray) -> None:
    chunks = pcm_chunks(audio)
    events: list[object] = []
    first_caption = threading.Event()
    with CaptionClient(f"127.0.0.1:{gateway.port}", limits=LIMITS) as client:
        stream = client.stream(sample_rate_hz=SR, interim_results=True)

        def feed() -> None:
            for i, c in enumerate(chunks):
                if i == RESTART_AFTER_CHUNKS:
                    first_caption.wait(60)
                    gateway.restart()
                stream.send(c)
            stream.finalize()

        feeder = threading.Thread(target=feed)
        feeder.start()
        for ev in stream.events(timeout=120):
            events.append(ev)
            if isinstance(ev, captions_pb2.CaptionEvent):
                first_caption.set()
        feeder.join(30)
        stream.close()
        assert stream.reconnects.count >= 1
        assert stream.state.started is not None and stream.state.started.resumed  # the same session, resumed
        assert len(gateway.extra) == 1
        check_exactly_once(gateway.stack.redis_url, stream.session_id, events)


def test_asyncio_client_rides_out_a_gateway_restart(gateway: Restartable, audio: np.ndarray) -> None:
    chunks = pcm_chunks(audio)

    async def run() -> tuple[str, list[object], int]:
        events: list[object] = []
        first_caption = asyncio.Event()
        async with AsyncCaptionClient(f"127.0.0.1:{gateway.port}", limits=LIMITS) as client:
            stream = client.stream(sample_rate_hz=SR, interim_results=True)

            async def feed() -> None:
                for i, c in enumerate(chunks):
                    if i == RESTART_AFTER_CHUNKS:
                        await asyncio.wait_for(first_caption.wait(), 60)
                        await asyncio.to_thread(gateway.restart)
                    await stream.send(c)
                await stream.finalize()

            feeder = asyncio.create_task(feed())
            async for ev in stream.events(timeout=120):
                events.append(ev)
                if isinstance(ev, captions_pb2.CaptionEvent):
                    first_caption.set()
            await feeder
            await stream.close()
            assert stream.state.started is not None and stream.state.started.resumed
            return stream.session_id, events, stream.reconnects.count

    sid, events, reconnects = asyncio.run(run())
    assert reconnects >= 1 and len(gateway.extra) == 1
    check_exactly_once(gateway.stack.redis_url, sid, events)


def test_a_bad_config_fails_at_once_without_retrying(stack: LiveStack) -> None:
    with CaptionClient(stack.target, limits=LIMITS) as client:
        stream = client.stream(sample_rate_hz=1000)
        t = time.monotonic()
        with pytest.raises(StreamFailed) as e:
            list(stream.events(timeout=30))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert stream.reconnects.count == 0 and time.monotonic() - t < 10
        with pytest.raises(StreamFailed):
            stream.send(b"\0\0" * 160)
        stream.close()


def test_an_unreachable_gateway_fails_after_the_reconnect_budget() -> None:
    limits = ClientLimits(reconnect_seconds=1.0, backoff_base_seconds=0.05, backoff_cap_seconds=0.2)
    with CaptionClient("127.0.0.1:9", limits=limits) as client:  # discard port: nothing listens
        stream = client.stream(sample_rate_hz=SR)
        t = time.monotonic()
        with pytest.raises(StreamFailed, match="could not reach"):
            list(stream.events(timeout=30))
        assert 1.0 <= time.monotonic() - t < 15 and stream.reconnects.count >= 2
        stream.close()


# --- the resend buffer, without a server --------------------------------------------------------


def state(max_unacked: float = 1.0, channels: int = 1) -> StreamState:
    cfg = captions_pb2.SessionConfig(sample_rate_hz=SR, channels=channels)
    return StreamState(cfg, ClientLimits(max_unacked_seconds=max_unacked, chunk_seconds=0.1))


def test_audio_is_split_into_whole_frames_and_remainders_wait() -> None:
    s = state(channels=2)  # 4 bytes per frame
    pieces = s.split(b"\1" * 6403)  # 0.1 s is 6400 bytes; 3 bytes short of a frame wait
    assert [len(p) for p in pieces] == [6400]
    assert [len(p) for p in s.split(b"\1")] == [4]


def test_the_buffer_fills_until_the_server_encodes_then_frees() -> None:
    s = state(max_unacked=1.0)
    for _ in range(10):
        assert s.has_room()
        s.number(b"\0" * 3200)  # 0.1 s each
    assert not s.has_room() and s.unacked_chunks == 10
    assert s.on_event(captions_pb2.CaptionEvent(event_id="1-0", audio_processed_seconds=0.5))
    assert s.has_room() and s.unacked_chunks == 5
    assert not s.on_event(captions_pb2.CaptionEvent(event_id="1-0", audio_processed_seconds=0.5))  # a repeat


def test_a_resume_resends_what_the_server_lacks_and_refuses_a_gap() -> None:
    s = state(max_unacked=10.0)
    s.on_started(captions_pb2.SessionStarted(session_id="abc", resume_secret="x"))
    reqs = [s.number(b"\0" * 3200) for _ in range(5)]
    assert [r.audio.seq for r in reqs] == [1, 2, 3, 4, 5]
    again = s.on_started(captions_pb2.SessionStarted(session_id="abc", resumed=True, last_seq=3))
    assert [r.audio.seq for r in again] == [4, 5]
    assert s.first_request().config.session_id == "abc" and s.first_request().config.resume_secret == "x"
    s.on_event(captions_pb2.CaptionEvent(event_id="2-0", audio_processed_seconds=0.5))  # frees 4 and 5
    s.number(b"\0" * 3200)  # 6
    with pytest.raises(FailedPrecondition, match="lost"):
        s.on_started(captions_pb2.SessionStarted(session_id="abc", resumed=True, last_seq=2))


def test_the_example_streams_a_file(
    stack: LiveStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wav = tmp_path / "clip.wav"
    write_wav(wav, clip([("low_tone", 4.0)], seed=7))
    assert asyncio.run(stream_file(str(wav), stack.target, speed=50.0)) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("final") and "low_tone" in types_in_caption(line) for line in out), out
    assert out[-1] == "ended   4.0 s of audio, 0 reconnect(s)"
