"""Fuzzing (hypothesis) of everything a client or an operator hands the services: the public
protos over a running stack (StreamCaptions, Caption, BatchCaption), raw PCM bytes and encodings,
encoded audio bytes, SDP offers over HTTP, dataset CSVs, API keys files and session settings.
Only documented outcomes are allowed (never INTERNAL/UNKNOWN, never a 500, never an exception
other than the documented ones), and the servers still serve afterwards. A few thousand cases,
well under a minute."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoder_service.server import start_encoder_server
from lm_service.engines.base import CaptionEngine
from lm_service.server import start_lm_server
from services.audio.io import decode_audio
from services.audio.pcm import pcm_to_mono16k
from services.errors import AudioDecodeError, ConfigError, DatasetError, InvalidArgument
from services.gateway.live import GatewayLimits
from services.gateway.server import GatewayServer, start_gateway
from services.jobs.validate import check_dataset
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc
from services.security import parse_keys
from services.transport.redis_server import PrivateRedis
from services.wire.settings import settings_from_hash, settings_from_json
from tests.e2e.helpers import clip, collect, requests_for
from tests.gateway.test_http import http

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ALLOWED_STREAM = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # our own short client deadline
    grpc.StatusCode.CANCELLED,
}
ALLOWED_CAPTION = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

texts = st.text(max_size=40) | st.sampled_from(
    ["<|AUDIO|>", "<|im_end|>", "x" * 1001, "\x00", "Caption the audio."]
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from(
    [0.0, 0.2, 1.0, 10.0, 30.0]
)
uint32 = st.integers(min_value=0, max_value=2**32 - 1) | st.sampled_from([0, 1, 8000, 16000, 48000, 48001])


@dataclass
class FuzzStack:
    gateway: GatewayServer
    stub: captions_pb2_grpc.CaptionServiceStub
    web: str


@pytest.fixture(scope="module")
def fuzz_stack(
    redis_server: PrivateRedis, engine: CaptionEngine, encoder_model: MiDashengLM
) -> Iterator[FuzzStack]:
    """One stack for every example (sessions are given up after 1 s without their client)."""
    enc = start_encoder_server(encoder_model, redis_server.url)
    lm = start_lm_server(engine, redis_server.url, workers=1, worker_prefix="fuzz")
    limits = GatewayLimits(resume_retention_seconds=1.0, max_streams_per_address=0, lm_admission=False)
    gw = start_gateway(
        redis_server.url,
        f"127.0.0.1:{enc.port}",
        f"127.0.0.1:{lm.port}",
        limits=limits,
        http_address="127.0.0.1:0",
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
    try:
        yield FuzzStack(gw, captions_pb2_grpc.CaptionServiceStub(channel), f"http://127.0.0.1:{gw.http_port}")
    finally:
        channel.close()
        gw.stop(1.0)
        lm.stop(1.0)
        enc.stop(1.0)


session_configs = st.builds(
    captions_pb2.SessionConfig,
    sample_rate_hz=uint32,
    encoding=st.integers(min_value=0, max_value=5),
    channels=st.integers(min_value=0, max_value=12),
    prompt=texts,
    window_seconds=floats,
    hop_seconds=floats,
    interim_results=st.booleans(),
    adapter=st.sampled_from(["", "nope", "../x", "a" * 70]),
    language=st.sampled_from(["", "en", "x" * 40]),
    session_id=st.sampled_from(["", "", "", "unknown-session", "bad id!", "x" * 80]),
    resume_after_event_id=st.sampled_from(["", "abc", "1-0", "99999999999999-0"]),
    resume_secret=st.sampled_from(["", "wrong"]),
    max_new_tokens=st.integers(min_value=0, max_value=600),
    interim_window=st.integers(min_value=0, max_value=4),
)
later_messages = st.lists(
    st.one_of(
        st.builds(
            lambda d, s: captions_pb2.StreamCaptionsRequest(audio=captions_pb2.AudioChunk(data=d, seq=s)),
            st.binary(max_size=3201),
            st.integers(min_value=0, max_value=5),
        ),
        st.builds(
            lambda a: captions_pb2.StreamCaptionsRequest(control=captions_pb2.Control(action=a)),
            st.integers(min_value=0, max_value=5),
        ),
        st.builds(lambda c: captions_pb2.StreamCaptionsRequest(config=c), session_configs),
        st.just(captions_pb2.StreamCaptionsRequest()),
    ),
    max_size=6,
)


@FAST
@given(first=st.one_of(session_configs.map(lambda c: captions_pb2.StreamCaptionsRequest(config=c)), later_messages.map(lambda m: m[0] if m else captions_pb2.StreamCaptionsRequest())), rest=later_messages)  # fmt: skip
def test_fuzzed_streams_get_only_documented_statuses(
    fuzz_stack: FuzzStack,
    first: captions_pb2.StreamCaptionsRequest,
    rest: list[captions_pb2.StreamCaptionsRequest],
) -> None:
    call = fuzz_stack.stub.StreamCaptions(iter([first, *rest]), timeout=3)
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        assert e.code() in ALLOWED_STREAM, f"{e.code()}: {e.details()}"
    finally:
        call.cancel()


valid_configs = st.builds(
    captions_pb2.SessionConfig,
    sample_rate_hz=st.sampled_from([8000, 16000, 44100, 48000]),
    encoding=st.sampled_from([1, 2]),
    channels=st.integers(min_value=1, max_value=3),
    window_seconds=st.sampled_from([1.0, 2.0, 10.0]),
    hop_seconds=st.sampled_from([0.2, 1.0]),
    interim_results=st.booleans(),
    prompt=texts,
)
chunks = st.lists(
    st.one_of(
        st.builds(
            lambda d, s: captions_pb2.StreamCaptionsRequest(audio=captions_pb2.AudioChunk(data=d, seq=s)),
            st.binary(min_size=2, max_size=8000),
            st.integers(min_value=0, max_value=4),
        ),
        st.builds(
            lambda a: captions_pb2.StreamCaptionsRequest(control=captions_pb2.Control(action=a)),
            st.sampled_from([1, 1, 3, 4, 7]),
        ),
    ),
    max_size=8,
)


@settings(FAST, max_examples=40)
@given(cfg=valid_configs, rest=chunks)
def test_fuzzed_audio_in_live_sessions_gets_only_documented_statuses(
    fuzz_stack: FuzzStack, cfg: captions_pb2.SessionConfig, rest: list[captions_pb2.StreamCaptionsRequest]
) -> None:
    """Sessions that start, then random bytes as audio, seqs, keep-alives, FINALIZE, CLOSE."""
    call = fuzz_stack.stub.StreamCaptions(
        iter([captions_pb2.StreamCaptionsRequest(config=cfg), *rest]), timeout=5
    )
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        assert e.code() in ALLOWED_STREAM, f"{e.code()}: {e.details()}"
    finally:
        call.cancel()


raw_audio = st.builds(
    captions_pb2.RawAudio,
    data=st.binary(max_size=6400),
    sample_rate_hz=uint32,
    encoding=st.integers(min_value=0, max_value=4),
    channels=st.integers(min_value=0, max_value=10),
)
caption_requests = st.one_of(
    st.builds(
        captions_pb2.CaptionRequest,
        raw_audio=raw_audio,
        prompt=texts,
        request_id=st.text(max_size=130),
        adapter=st.sampled_from(["", "missing", "../etc"]),
        options=st.builds(
            captions_pb2.GenerationOptions,
            max_new_tokens=st.integers(min_value=0, max_value=300),
            temperature=st.floats(width=32, allow_nan=True),
            top_p=st.floats(width=32, allow_nan=True),
        ),
    ),
    st.builds(captions_pb2.CaptionRequest, encoded_audio=st.binary(max_size=2000)),
    st.just(captions_pb2.CaptionRequest()),
)


@settings(FAST, max_examples=120)
@given(req=caption_requests)
def test_fuzzed_offline_requests_get_only_documented_statuses(
    fuzz_stack: FuzzStack, req: captions_pb2.CaptionRequest
) -> None:
    try:
        resp = fuzz_stack.stub.Caption(req, timeout=60)
        assert isinstance(resp.text, str)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED_CAPTION, f"{e.code()}: {e.details()}"


@settings(FAST, max_examples=40)
@given(items=st.lists(caption_requests, max_size=5))
def test_fuzzed_batches_fail_item_by_item(
    fuzz_stack: FuzzStack, items: list[captions_pb2.CaptionRequest]
) -> None:
    resp = fuzz_stack.stub.BatchCaption(captions_pb2.BatchCaptionRequest(items=items), timeout=120)
    assert [r.index for r in resp.results] == list(range(len(items)))
    for r in resp.results:
        if r.WhichOneof("outcome") == "error":
            assert r.error.code in {c.value[0] for c in ALLOWED_CAPTION}, r.error


sdp_lines = st.sampled_from(
    ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "m=audio 9 UDP/TLS/RTP/SAVPF 111", "m=video 9 RTP/AVP 0",
     "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "a=mid:0", "a=sendonly", "a=rtpmap:111 opus/48000/2",
     "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuv", "a=setup:actpass", "c=IN IP4 0.0.0.0",
     "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=group:BUNDLE 0"]
) | st.text(max_size=30)  # fmt: skip


@settings(FAST, max_examples=150)
@given(
    lines=st.lists(sdp_lines, max_size=25),
    kind=st.sampled_from(["offer", "answer", ""]),
    config=st.one_of(st.none(), st.dictionaries(st.sampled_from(["prompt", "hop_seconds", "x"]), st.integers() | st.text(max_size=5), max_size=2)),
)  # fmt: skip
def test_fuzzed_sdp_offers_are_answered_or_refused_never_a_500(
    fuzz_stack: FuzzStack, lines: list[str], kind: str, config: object
) -> None:
    body = {"sdp": "\r\n".join(["v=0", *lines]) + "\r\n", "type": kind, "config": config}
    status, _, text = http("POST", fuzz_stack.web + "/api/webrtc/offer", body)
    assert status in (200, 400, 409, 503), (status, text)


@settings(FAST, max_examples=300)
@given(
    data=st.binary(max_size=4096),
    rate=st.integers(min_value=7000, max_value=50000),
    encoding=st.sampled_from(["LINEAR16", "FLOAT32"]),
    channels=st.integers(min_value=1, max_value=9),
)
def test_fuzzed_pcm_bytes_convert_or_are_refused(
    data: bytes, rate: int, encoding: str, channels: int
) -> None:
    try:
        out = pcm_to_mono16k(data, rate, encoding, channels)
    except InvalidArgument:
        return
    assert out.dtype == np.float32 and bool(np.isfinite(out).all())
    assert float(np.abs(out).max(initial=0.0)) <= 1.0 + 1e-3


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (np.sin(np.arange(4000) / 5) * 0.5).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


WAV = _wav()


@settings(FAST, max_examples=300)
@given(
    cut=st.integers(min_value=0, max_value=len(WAV)),
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(WAV) - 1), st.integers(0, 255)), max_size=8
    ),
    prefix=st.sampled_from(
        [b"", b"#EXTM3U\n", b"ffconcat version 1.0\n", b"fLaC", b"OggS", b"\x1aE\xdf\xa3"]
    ),
)
def test_fuzzed_encoded_audio_decodes_or_is_refused(
    cut: int, flips: list[tuple[int, int]], prefix: bytes
) -> None:
    data = bytearray(WAV[:cut])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    try:
        out = decode_audio(prefix + bytes(data), max_seconds=300.0)
    except AudioDecodeError:
        return
    assert out.dtype == np.float32 and out.size <= 300 * 16000 and bool(np.isfinite(out).all())


csv_cells = st.text(max_size=12) | st.sampled_from(["audio", "prediction", "a.wav", "", "\x00", '"', "\n"])


@settings(FAST, max_examples=200)
@given(
    header=st.lists(csv_cells, max_size=5),
    rows=st.lists(st.lists(csv_cells, max_size=5), max_size=5),
    binary=st.binary(max_size=64),
    use_binary=st.booleans(),
)
def test_fuzzed_dataset_csvs_are_validated_never_crash(
    tmp_path_factory: pytest.TempPathFactory,
    header: list[str],
    rows: list[list[str]],
    binary: bytes,
    use_binary: bool,
) -> None:
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    if use_binary:
        path.write_bytes(binary)
    else:
        path.write_text("\n".join(",".join(r) for r in [header, *rows]), encoding="utf-8")
    v = check_dataset(str(path))  # a job's dataset check: a verdict, never an exception
    assert v.error is not None or v.rows >= 0


@settings(FAST, max_examples=300)
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["keys", "tenant", "scopes", "sha256"]), inner, max_size=4),
        max_leaves=12,
    ),
    raw=st.text(max_size=40),
)  # fmt: skip
def test_fuzzed_api_key_files_and_settings_are_refused_cleanly(doc: object, raw: str) -> None:
    for text in (json.dumps(doc), raw):
        try:
            parse_keys(text)
        except ConfigError:
            pass
    try:
        settings_from_json(doc)
    except InvalidArgument:
        pass
    if isinstance(doc, dict):
        try:
            settings_from_hash({str(k): str(v) for k, v in doc.items()})
        except InvalidArgument:
            pass


def test_the_stack_still_serves_after_the_fuzzing(fuzz_stack: FuzzStack) -> None:
    res = collect(fuzz_stack.stub.StreamCaptions(requests_for(clip([("high_tone", 3.0)])), timeout=120))
    assert res.error is None and res.finals, res.table()
    assert http("GET", fuzz_stack.web + "/healthz")[0] == 200
    assert fuzz_stack.stub.Caption(
        captions_pb2.CaptionRequest(
            raw_audio=captions_pb2.RawAudio(data=b"\0\0" * 16000, sample_rate_hz=16000)
        ),
        timeout=60,
    ).text
    assert math.isfinite(len(fuzz_stack.gateway.gateway))


_ = (DatasetError, Path)
