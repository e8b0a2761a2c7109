"""Resume: a client that drops mid-stream reconnects with session_id + resume_after_event_id, gets
exactly the events it missed (checked against the session's caption stream in Redis) and goes on
sending audio from SessionStarted.last_seq + 1."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import redis

from services.errors import FailedPrecondition
from services.gateway.live import GatewayLimits
from services.pb.midasheng.v1 import captions_pb2
from services.training.synth import types_in_caption
from services.transport import keys
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    SECRETS,
    STREAM_TIMEOUT_S,
    Feeder,
    audio_req,
    clip,
    collect,
    config,
    control,
    event_key,
    pcm_chunks,
    remember,
)

FIRST_PART_CHUNKS = 120  # 12 s sent before the drop


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return clip([("high_tone", 10.0), ("white_noise", 10.0)], seed=1)


def first_connection(stack: LiveStack, chunks: list[bytes], min_captions: int = 2) -> tuple[str, list[str]]:
    """Send 12 s, read until ``min_captions`` caption events arrived, then cancel the call.
    Returns (session id, caption event ids seen). Two always come (segment 0's final and an
    interim of segment 1); more depend on how far the LM worker is behind (it coalesces interims)."""
    feeder = Feeder()
    feeder.put(config(), *[audio_req(d, i + 1) for i, d in enumerate(chunks[:FIRST_PART_CHUNKS])])
    call = stack.stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S)
    seen: list[str] = []
    first = remember(next(call))
    assert first.WhichOneof("response") == "started"
    sid = first.started.session_id
    for resp in call:
        kind = resp.WhichOneof("response")
        assert kind in ("caption", "error"), resp
        if kind == "caption":
            seen.append(resp.caption.event_id)
            if len(seen) >= min_captions:
                break
    call.cancel()
    feeder.close()
    assert call.code() == grpc.StatusCode.CANCELLED
    return sid, seen


def caption_stream(redis_url: str, sid: str) -> list[tuple[str, dict[str, str]]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [
            (i.decode(), {k.decode(): v.decode() for k, v in f.items()})
            for i, f in client.xrange(keys.session_captions(sid))
        ]
    finally:
        client.close()


def test_resume_replays_exactly_the_missed_events_and_audio_continues(
    stack: LiveStack, audio: np.ndarray
) -> None:
    chunks = pcm_chunks(audio)
    sid, seen = first_connection(stack, chunks)
    time.sleep(0.5)  # events keep being made for the audio already sent while the client is away

    feeder = Feeder()
    feeder.put(config(session_id=sid, resume_after_event_id=seen[-1]))
    call = stack.stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S)
    started = next(call)
    assert started.WhichOneof("response") == "started", started
    st = started.started
    assert st.session_id == sid and st.resumed
    assert 1 <= st.last_seq <= FIRST_PART_CHUNKS
    assert st.effective_config.resume_after_event_id == seen[-1]
    # Go on from last_seq + 1 (what the server did not take is sent again).
    feeder.put(*[audio_req(d, i + 1) for i, d in enumerate(chunks) if i + 1 > st.last_seq])
    feeder.close()
    rest = collect(call)
    assert rest.error is None, f"{rest.error}\n{rest.table()}"
    assert rest.responses and rest.kinds()[-1] == "ended", rest.table()

    stored = caption_stream(stack.redis_url, sid)
    assert [f.get("type", "caption") for _, f in stored].count("error") == 0, stored
    stored_ids = [i for i, _ in stored]
    cut = stored_ids.index(seen[-1])
    # The first connection saw every event up to its last one, the second exactly those after it.
    assert stored_ids[: cut + 1] == seen
    assert stored[-1][1].get("type") == "end"
    got_after = [c.event_id for c in rest.captions]
    assert got_after == stored_ids[cut + 1 : -1], rest.table()  # every caption after the cursor
    assert rest.ended.last_event_id == got_after[-1]
    assert all(event_key(i) > event_key(seen[-1]) for i in got_after)
    # Same content as stored, in order.
    stored_caps = [f for _, f in stored[cut + 1 :] if f.get("type", "caption") == "caption"]
    assert [(c.segment_id, c.revision, c.text, c.is_final) for c in rest.captions] == [
        (int(f["segment_id"]), int(f["revision"]), f["text"], f["is_final"] == "1") for f in stored_caps
    ]

    # The audio continued seamlessly: 20 s, two final segments.
    assert rest.ended.total_audio_seconds == pytest.approx(20.0, abs=0.05)
    finals = [f for _, f in stored if f.get("is_final") == "1"]
    assert [(f["segment_id"], float(f["window_start"]), float(f["window_end"])) for f in finals] == [
        ("0", 0.0, 10.0),
        ("1", 10.0, 20.0),
    ], stored
    assert "high_tone" in types_in_caption(finals[0]["text"]), finals
    assert "white_noise" in types_in_caption(finals[1]["text"]), finals
    pairs = [(f["segment_id"], f["revision"]) for _, f in stored if f.get("type", "caption") == "caption"]
    assert len(pairs) == len(set(pairs)), stored


def test_resending_already_received_chunks_after_resume_is_harmless(
    stack: LiveStack, audio: np.ndarray
) -> None:
    """A client that does not look at last_seq and re-sends from seq 1: duplicates are dropped."""
    chunks = pcm_chunks(audio)
    sid, seen = first_connection(stack, chunks, min_captions=1)
    reqs = [config(session_id=sid, resume_after_event_id=seen[-1])] + [
        audio_req(d, i + 1) for i, d in enumerate(chunks)
    ]
    res = collect(stack.stub.StreamCaptions(iter(reqs), timeout=STREAM_TIMEOUT_S))
    assert res.error is None, f"{res.error}\n{res.table()}"
    assert res.ended.total_audio_seconds == pytest.approx(20.0, abs=0.05), res.table()
    finals = [f for _, f in caption_stream(stack.redis_url, sid) if f.get("is_final") == "1"]
    assert [(f["segment_id"], float(f["window_start"]), float(f["window_end"])) for f in finals] == [
        ("0", 0.0, 10.0),
        ("1", 10.0, 20.0),
    ], res.table()
    assert res.finals and res.finals[-1].segment_id == 1, res.table()  # what came after the cursor


def test_resume_with_session_id_only_replays_everything(stack: LiveStack, audio: np.ndarray) -> None:
    chunks = pcm_chunks(audio)
    sid, seen = first_connection(stack, chunks, min_captions=2)
    res = collect(stack.stub.StreamCaptions(iter([config(session_id=sid)]), timeout=STREAM_TIMEOUT_S))
    assert res.error is None, res.error
    assert res.started.resumed
    assert [c.event_id for c in res.captions][: len(seen)] == seen


def test_old_call_ending_after_a_resume_does_not_reap_the_resumed_session(
    make_stack: Callable[..., LiveStack], audio: np.ndarray
) -> None:
    stack = make_stack(limits=GatewayLimits(resume_retention_seconds=1.0))
    chunks = pcm_chunks(audio)
    old = Feeder()
    old.put(config(), *[audio_req(d, i + 1) for i, d in enumerate(chunks[:50])])
    call1 = stack.stub.StreamCaptions(iter(old), timeout=STREAM_TIMEOUT_S)
    first = remember(next(call1))
    sid = first.started.session_id
    cursor = ""
    for resp in call1:  # read one caption so the first 50 chunks are in
        if resp.WhichOneof("response") == "caption":
            cursor = resp.caption.event_id
            break
    # The client reconnects before the server noticed the old connection died (common on mobile).
    new = Feeder()
    new.put(config(session_id=sid, resume_after_event_id=cursor))
    call2 = stack.stub.StreamCaptions(iter(new), timeout=STREAM_TIMEOUT_S)
    started = next(call2).started
    assert started.resumed
    call1.cancel()  # now the old connection goes away
    old.close()
    time.sleep(2.5)  # longer than resume_retention_seconds, with the client attached
    new.put(*[audio_req(d, i + 1) for i, d in enumerate(chunks) if i + 1 > started.last_seq])
    new.close()
    res = collect(call2)
    assert res.error is None, f"{res.error.code()}: {res.error.details()}"
    assert res.responses[-1].ended.total_audio_seconds == pytest.approx(20.0, abs=0.05)


def test_resume_unknown_session_is_not_found(stack: LiveStack) -> None:
    res = collect(
        stack.stub.StreamCaptions(
            iter([config(session_id="nope", resume_after_event_id="1-0")]), timeout=STREAM_TIMEOUT_S
        )
    )
    assert res.error is not None and res.error.code() == grpc.StatusCode.NOT_FOUND, res.error
    assert "nope" in res.error.details()
    ok = collect(
        stack.stub.StreamCaptions(
            iter([config(), audio_req(b"\x00\x00" * 16000, 1)]), timeout=STREAM_TIMEOUT_S
        )
    )
    assert ok.error is None and ok.kinds()[-1] == "ended"
    assert captions_pb2.SessionEnded.CLIENT_CLOSED == ok.ended.reason


def test_a_finalized_session_can_be_resumed_for_the_events_it_missed(
    stack: LiveStack, audio: np.ndarray
) -> None:
    chunks = pcm_chunks(audio)
    feeder = Feeder()
    feeder.put(
        config(), *[audio_req(d, i + 1) for i, d in enumerate(chunks)], control(captions_pb2.Control.FINALIZE)
    )
    call = stack.stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S)
    sid = remember(next(call)).started.session_id
    seen: list[str] = []
    for resp in call:
        if resp.WhichOneof("response") == "caption":
            seen.append(resp.caption.event_id)
            break  # the first caption (segment 1's final has not been made yet: it needs the end)
    client = redis.Redis.from_url(stack.redis_url)
    try:  # the gateway took the FINALIZE (the encoder has the end) before the client vanishes
        deadline = time.monotonic() + 30
        while client.hget(keys.session_config(sid), "ended") != b"1" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.hget(keys.session_config(sid), "ended") == b"1"
    finally:
        client.close()
    call.cancel()
    feeder.close()

    res = collect(
        stack.stub.StreamCaptions(
            iter([config(session_id=sid, resume_after_event_id=seen[-1])]), timeout=STREAM_TIMEOUT_S
        )
    )
    assert res.error is None, f"{res.error}\n{res.table()}"
    assert res.started.resumed and res.kinds()[-1] == "ended", res.table()
    stored = caption_stream(stack.redis_url, sid)
    ids = [i for i, f in stored if f.get("type", "caption") == "caption"]
    assert [c.event_id for c in res.captions] == ids[ids.index(seen[-1]) + 1 :], res.table()
    assert [(c.segment_id, c.window_end_seconds) for c in res.finals][-1] == (1, 20.0), res.table()

    # It takes no more audio (asked of the gateway directly: over the stream, the replay of the
    # end can finish the call before a late chunk is looked at).
    resumed = stack.gateway.gateway.resume(sid, SECRETS[sid])
    assert resumed.ended
    with pytest.raises(FailedPrecondition, match="finalized"):
        resumed.feed(chunks[0], len(chunks) + 2)
