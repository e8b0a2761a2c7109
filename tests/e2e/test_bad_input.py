"""Bad input gets the exact gRPC status and a message that says what is wrong; the servers stay
up (a normal stream works afterwards). Health and reflection on every server."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.gateway.live import GatewayLimits
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    CALL_TIMEOUT_S,
    STREAM_TIMEOUT_S,
    Collected,
    Feeder,
    audio_req,
    clip,
    collect,
    config,
    control,
    pcm_chunks,
    requests_for,
)


@pytest.fixture(scope="module")
def short_clip() -> np.ndarray:
    return clip([("low_tone", 3.0)], seed=21)


def still_works(stack: LiveStack, audio: np.ndarray, metadata: list[tuple[str, str]] | None = None) -> None:
    res = collect(stack.stub.StreamCaptions(requests_for(audio), timeout=STREAM_TIMEOUT_S, metadata=metadata))
    assert res.error is None, f"{res.error}\n{res.table()}"
    assert res.kinds()[0] == "started" and res.kinds()[-1] == "ended", res.table()
    assert res.finals and res.ended.total_audio_seconds == pytest.approx(3.0, abs=0.05)


def failing(
    stack: LiveStack,
    reqs: list[captions_pb2.StreamCaptionsRequest],
    code: grpc.StatusCode,
    *needles: str,
    metadata: list[tuple[str, str]] | None = None,
) -> Collected:
    res = collect(stack.stub.StreamCaptions(iter(reqs), timeout=CALL_TIMEOUT_S, metadata=metadata))
    assert res.error is not None, f"expected {code.name}, the call succeeded:\n{res.table()}"
    assert res.error.code() == code, f"{res.error.code()}: {res.error.details()}"
    details = res.error.details() or ""
    for n in needles:
        assert n in details, f"{n!r} not in {details!r}"
    assert "internal error" not in details
    return res


def chunk16(seconds: float = 0.1) -> bytes:
    return b"\x01\x00" * int(16000 * seconds)


CASES: dict[str, tuple[list[captions_pb2.StreamCaptionsRequest], grpc.StatusCode, tuple[str, ...]]] = {
    "sample_rate_1000": (
        [config(sample_rate_hz=1000)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ("sample_rate_hz", "1000", "8000", "48000"),
    ),
    "unknown_encoding": ([config(encoding=7)], grpc.StatusCode.INVALID_ARGUMENT, ("encoding", "7")),
    "audio_before_config": (
        [audio_req(chunk16(), 1)],
        grpc.StatusCode.FAILED_PRECONDITION,
        ("SessionConfig",),
    ),
    "resume_unknown_session": (
        [config(session_id="no-such-session", resume_after_event_id="1-0")],
        grpc.StatusCode.NOT_FOUND,
        ("no-such-session",),
    ),
    "odd_length_linear16": (
        [config(), audio_req(chunk16(), 1), audio_req(b"\x01\x02\x03", 2)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ("LINEAR16", "multiple of 2", "3"),
    ),
    "float32_nan": (
        [
            config(encoding=captions_pb2.FLOAT32),
            audio_req(struct.pack("<4f", 0.1, float("nan"), 0.2, 0.3), 1),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        ("NaN",),
    ),
    "second_config": (
        [config(), audio_req(chunk16(), 1), config()],
        grpc.StatusCode.INVALID_ARGUMENT,
        ("SessionConfig", "first"),
    ),
    "seq_gap": (
        [config(), audio_req(chunk16(), 1), audio_req(chunk16(), 3)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ("seq 3",),
    ),
    "unspecified_control": (
        [config(), control(captions_pb2.Control.ACTION_UNSPECIFIED)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ("control",),
    ),
    "window_too_long": (
        [config(window_seconds=100.0)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ("window_seconds",),
    ),
    "eleven_channels": ([config(channels=11)], grpc.StatusCode.INVALID_ARGUMENT, ("channels", "11")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_stream_input_gets_a_clear_status(stack: LiveStack, short_clip: np.ndarray, case: str) -> None:
    reqs, code, needles = CASES[case]
    failing(stack, reqs, code, *needles)
    still_works(stack, short_clip)


def test_oversized_chunk_names_the_limit(stack: LiveStack, short_clip: np.ndarray) -> None:
    feeder = Feeder()
    feeder.put(config())
    call = stack.stub.StreamCaptions(iter(feeder), timeout=CALL_TIMEOUT_S)
    started = next(call).started
    limit = started.limits.max_chunk_bytes
    assert limit == GatewayLimits().max_chunk_bytes
    feeder.put(audio_req(b"\x00\x00" * (limit // 2 + 1), 1))
    feeder.close()
    res = collect(call)
    assert res.error is not None and res.error.code() == grpc.StatusCode.INVALID_ARGUMENT, res.error
    assert str(limit) in res.error.details() and str(limit + 2) in res.error.details(), res.error.details()
    still_works(stack, short_clip)


def test_client_that_sends_nothing_gets_deadline_exceeded(
    make_stack: Callable[..., LiveStack], short_clip: np.ndarray
) -> None:
    stack = make_stack(limits=GatewayLimits(first_message_timeout_seconds=1.0))
    feeder = Feeder(idle_s=10.0)
    t0 = time.monotonic()
    res = collect(stack.stub.StreamCaptions(iter(feeder), timeout=CALL_TIMEOUT_S))
    feeder.close()
    assert res.error is not None and res.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, res.error
    assert "SessionConfig" in res.error.details()
    assert 0.9 <= time.monotonic() - t0 < 5.0
    still_works(stack, short_clip)


def test_token_is_required_when_configured(
    make_stack: Callable[..., LiveStack], short_clip: np.ndarray
) -> None:
    stack = make_stack(token="s3cret")
    for md in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
        failing(
            stack,
            [config(), audio_req(chunk16(), 1)],
            grpc.StatusCode.UNAUTHENTICATED,
            "authorization",
            metadata=md,
        )
        with pytest.raises(grpc.RpcError) as e:
            stack.stub.Caption(
                captions_pb2.CaptionRequest(
                    raw_audio=captions_pb2.RawAudio(data=chunk16(1.0), sample_rate_hz=16000)
                ),
                timeout=CALL_TIMEOUT_S,
                metadata=md,
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    still_works(stack, short_clip, metadata=[("authorization", "Bearer s3cret")])


def idle_session(stack: LiveStack) -> Collected:
    feeder = Feeder(idle_s=20.0)
    feeder.put(config())
    try:
        return collect(stack.stub.StreamCaptions(iter(feeder), timeout=CALL_TIMEOUT_S))
    finally:
        feeder.close()


def test_idle_client_gets_an_idle_error_then_session_ended(
    make_stack: Callable[..., LiveStack], short_clip: np.ndarray
) -> None:
    stack = make_stack(limits=GatewayLimits(idle_timeout_seconds=1.0))
    res = idle_session(stack)
    assert res.error is None, res.error
    assert res.kinds() == ["started", "error", "ended"], res.table()
    err = res.errors[0]
    assert err.reason == "IDLE_TIMEOUT" and not err.fatal, err
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "1 s" in err.message
    still_works(stack, short_clip)


def test_idle_session_ends_with_reason_idle_timeout(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(limits=GatewayLimits(idle_timeout_seconds=1.0))
    res = idle_session(stack)
    assert res.ended.reason == captions_pb2.SessionEnded.IDLE_TIMEOUT


def test_finalize_captions_everything_sent_then_ends(stack: LiveStack) -> None:
    chunks = pcm_chunks(clip([("high_tone", 3.0)], seed=22))
    reqs = [
        config(),
        *[audio_req(d, i + 1) for i, d in enumerate(chunks)],
        control(captions_pb2.Control.FINALIZE),
    ]
    res = collect(stack.stub.StreamCaptions(iter(reqs), timeout=STREAM_TIMEOUT_S))
    assert res.error is None, res.error
    assert res.kinds()[-1] == "ended", res.table()
    assert [(c.segment_id, c.window_start_seconds, c.window_end_seconds) for c in res.finals] == [
        (0, 0.0, 3.0)
    ]


def test_audio_after_finalize_is_a_failed_precondition(stack: LiveStack, short_clip: np.ndarray) -> None:
    chunks = pcm_chunks(clip([("high_tone", 2.0)], seed=22))
    reqs = [
        config(),
        *[audio_req(d, i + 1) for i, d in enumerate(chunks[:10])],
        control(captions_pb2.Control.FINALIZE),
        audio_req(chunks[10], 11),
    ]
    failing(stack, reqs, grpc.StatusCode.FAILED_PRECONDITION, "finalized")
    still_works(stack, short_clip)


def test_close_ends_without_captioning_the_open_window(stack: LiveStack) -> None:
    chunks = pcm_chunks(clip([("high_tone", 5.0)], seed=23))
    reqs = [
        config(),
        *[audio_req(d, i + 1) for i, d in enumerate(chunks)],
        control(captions_pb2.Control.CLOSE),
    ]
    res = collect(stack.stub.StreamCaptions(iter(reqs), timeout=STREAM_TIMEOUT_S))
    assert res.error is None, res.error
    assert res.kinds()[-1] == "ended", res.table()
    assert res.finals == [], res.table()  # the open window [0, 5] was dropped, as documented


def test_health_and_reflection_on_every_server(stack: LiveStack) -> None:
    servers = {
        "midasheng.v1.CaptionService": stack.gateway.port,
        "midasheng.v1.EncoderService": stack.encoder.port,
        "midasheng.v1.LMService": stack.lm.port if stack.lm else 0,
    }
    for service, port in servers.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING, (service, name)
            with pytest.raises(grpc.RpcError) as e:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            [answer] = list(
                refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            )
            names = {s.name for s in answer.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names, names
    # The public gateway's reflection describes the API fully (a generic client can call it).
    with grpc.insecure_channel(stack.target) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        [answer] = list(
            refl.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="midasheng.v1.CaptionService"
                        )
                    ]
                ),
                timeout=5,
            )
        )
        assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    assert captions_pb2_grpc.CaptionServiceStub  # the generated stub the clients use


def test_unknown_adapter_ends_the_session_with_not_found(stack: LiveStack, short_clip: np.ndarray) -> None:
    reqs = [
        config(adapter="no-such-adapter"),
        *[audio_req(d, i + 1) for i, d in enumerate(pcm_chunks(short_clip))],
    ]
    res = collect(stack.stub.StreamCaptions(iter(reqs), timeout=STREAM_TIMEOUT_S))
    errors = [r.error for r in res.responses if r.WhichOneof("response") == "error"]
    assert errors and errors[0].fatal and errors[0].code == grpc.StatusCode.NOT_FOUND.value[0], res.table()
    assert "no-such-adapter" in errors[0].message
    assert res.kinds()[-1] == "ended"
    still_works(stack, short_clip)  # the LM worker survived
