"""The services behind the gateway fail: an encoder that goes away mid-stream gives the client
UNAVAILABLE with words (not an opaque UNKNOWN), new sessions are refused the same way while it is
down, a resume after it came back without the session's audio says to start a new session, and a
new session then works. Errors of the LM service reach gateway clients with their own status."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import redis

from encoder_service.server import start_encoder_server
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2
from services.transport import keys
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    CALL_TIMEOUT_S,
    STREAM_TIMEOUT_S,
    Feeder,
    audio_req,
    clip,
    collect,
    config,
    pcm_chunks,
    remember,
    requests_for,
)


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return clip([("low_tone", 6.0)], seed=5)


def test_encoder_outage_mid_stream_is_reported_and_recovered_from(
    make_stack: Callable[..., LiveStack], redis_url: str, encoder_model: MiDashengLM, audio: np.ndarray
) -> None:
    stack = make_stack()
    port = stack.encoder.port
    chunks = pcm_chunks(audio)
    feeder = Feeder()
    feeder.put(
        config(window_seconds=2.0, hop_seconds=1.0), *[audio_req(d, i + 1) for i, d in enumerate(chunks[:30])]
    )
    call = stack.stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S)
    sid = remember(next(call)).started.session_id
    first = next(call)  # the pipeline runs: a caption for the audio sent so far
    assert first.WhichOneof("response") == "caption", first

    stack.encoder.stop(grace=0.5)
    feeder.put(*[audio_req(d, i + 1) for i, d in enumerate(chunks) if i >= 30])
    feeder.close()
    res = collect(call)
    assert res.error is not None, res.table()
    assert res.error.code() == grpc.StatusCode.UNAVAILABLE, f"{res.error.code()}: {res.error.details()}"
    assert "encoder service" in res.error.details() and sid in res.error.details(), res.error.details()

    # While it is down, new sessions are refused with the same status and words.
    down = collect(stack.stub.StreamCaptions(requests_for(audio[:16000]), timeout=CALL_TIMEOUT_S))
    assert down.error is not None and down.error.code() == grpc.StatusCode.UNAVAILABLE, down.table()
    assert "encoder service" in down.error.details()

    # The encoder comes back on the same address, without the session's audio.
    enc = start_encoder_server(encoder_model, redis_url, address=f"127.0.0.1:{port}")
    stack.extra.append(lambda: enc.stop(grace=1.0))
    deadline = time.monotonic() + 20
    while True:  # the gateway reconnects within its capped backoff
        again = Feeder()
        again.put(config(session_id=sid))
        again.close()
        resumed = collect(stack.stub.StreamCaptions(iter(again), timeout=CALL_TIMEOUT_S))
        assert resumed.error is not None, resumed.table()
        if resumed.error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert resumed.error.code() == grpc.StatusCode.FAILED_PRECONDITION, resumed.error.details()
    assert "start a new session" in resumed.error.details()
    # The session is given up everywhere: its stream ends with the reason, LM workers let it go
    # (lease released, not held until their silence timeout), and later resumes say the same.
    client = redis.Redis.from_url(redis_url)
    try:
        tail = [
            {k.decode(): v.decode() for k, v in f.items()}
            for _, f in client.xrevrange(keys.session_captions(sid), count=2)
        ][::-1]
        assert [t.get("type") for t in tail] == ["error", "end"], tail
        assert tail[0]["reason"] == "ENCODER_STATE_LOST" and tail[0]["fatal"] == "1", tail
        assert client.zscore(keys.ACTIVE_SESSIONS, sid) is None
        deadline = time.monotonic() + 10
        while client.exists(keys.session_lease(sid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.exists(keys.session_lease(sid)), "the LM worker still holds the abandoned session"
    finally:
        client.close()
    again = Feeder()
    again.put(config(session_id=sid))
    again.close()
    refused = collect(stack.stub.StreamCaptions(iter(again), timeout=CALL_TIMEOUT_S))
    assert refused.error is not None and refused.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "encoder lost its audio state" in refused.error.details()

    ok = collect(stack.stub.StreamCaptions(requests_for(audio[: 3 * 16000]), timeout=STREAM_TIMEOUT_S))
    assert ok.error is None, f"{ok.error}\n{ok.table()}"
    assert ok.finals and ok.ended.total_audio_seconds == pytest.approx(3.0, abs=0.05)


def test_lm_service_errors_keep_their_status_through_the_gateway(stack: LiveStack) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stack.stub.Caption(
            captions_pb2.CaptionRequest(encoded_audio=b"not audio at all"), timeout=CALL_TIMEOUT_S
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{e.value.code()}: {e.value.details()}"
    assert "internal error" not in e.value.details()
