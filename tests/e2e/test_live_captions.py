"""StreamCaptions end to end through the in-process stack: ordering, windows, caption content;
resampled input; offline Caption / BatchCaption through the gateway."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from services.audio.io import float_to_pcm16_bytes
from services.pb.midasheng.v1 import captions_pb2
from services.training.synth import types_in_caption
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    STREAM_TIMEOUT_S,
    Collected,
    audio_req,
    clip,
    collect,
    config,
    event_key,
    requests_for,
)

TONE_THEN_NOISE = [("high_tone", 10.0), ("white_noise", 10.0)]


@pytest.fixture(scope="module")
def two_part() -> np.ndarray:
    return clip(TONE_THEN_NOISE, seed=1)


def stream(stack: LiveStack, audio: np.ndarray, **cfg: object) -> Collected:
    return collect(stack.stub.StreamCaptions(requests_for(audio, **cfg), timeout=STREAM_TIMEOUT_S))


def check_finals_name_tone_then_noise(res: Collected) -> None:
    finals = {c.segment_id: c for c in res.finals}
    assert sorted(finals) == [0, 1], res.table()
    seg0, seg1 = types_in_caption(finals[0].text), types_in_caption(finals[1].text)
    assert "high_tone" in seg0 and "white_noise" not in seg0, (
        f"segment 0 final: {finals[0].text!r}\n{res.table()}"
    )
    assert "white_noise" in seg1 and "high_tone" not in seg1, (
        f"segment 1 final: {finals[1].text!r}\n{res.table()}"
    )


def test_stream_tone_then_noise_events_are_ordered_and_captions_name_the_sounds(
    stack: LiveStack, two_part: np.ndarray
) -> None:
    res = stream(stack, two_part)
    assert res.error is None, f"{res.error}\n{res.table()}"
    kinds = res.kinds()
    assert kinds[0] == "started" and kinds[-1] == "ended", res.table()
    assert kinds.count("started") == 1 and kinds.count("ended") == 1
    assert not res.errors, res.table()
    started = res.started
    assert started.session_id and not started.resumed and started.last_seq == 0
    assert started.effective_config.interim_results and started.effective_config.sample_rate_hz == 16000
    assert started.limits.max_chunk_bytes > 0

    caps = res.captions
    # Every segment's interims precede its final. The audio arrives faster than real time, so the
    # LM worker falls behind and captions only each read's newest window (coalescing): how many
    # interims a segment gets depends on timing, and there may be none.
    for seg in {c.segment_id for c in caps}:
        mine = [c for c in caps if c.segment_id == seg]
        assert mine[-1].is_final and not any(c.is_final for c in mine[:-1]), res.table()
        assert [c.revision for c in mine] == list(range(len(mine))), res.table()  # 0, 1, 2, ...
    # Segment ids never go back; event ids strictly increase.
    segs = [c.segment_id for c in caps]
    assert segs == sorted(segs), res.table()
    keys = [event_key(c.event_id) for c in caps]
    assert all(a < b for a, b in zip(keys, keys[1:], strict=False)), res.table()
    # Windows inside the stream; interims start where their segment does (SEGMENT, the default).
    for c in caps:
        assert 0.0 <= c.window_start_seconds < c.window_end_seconds <= 20.0 + 1e-6, res.table()
        assert c.window_start_seconds == pytest.approx(10.0 * c.segment_id), res.table()
    # Finals: one per segment, [0, 10] then [10, 20]: contiguous and covering the stream.
    finals = res.finals
    assert [c.segment_id for c in finals] == [0, 1], res.table()
    assert [(c.window_start_seconds, c.window_end_seconds) for c in finals] == [
        pytest.approx((0.0, 10.0)),
        pytest.approx((10.0, 20.0)),
    ], res.table()
    check_finals_name_tone_then_noise(res)

    ended = res.ended
    assert ended.reason == captions_pb2.SessionEnded.CLIENT_CLOSED
    assert ended.total_audio_seconds == pytest.approx(20.0, abs=0.05)
    assert event_key(ended.last_event_id) >= keys[-1]


def test_session_ended_last_event_id_is_the_last_caption_event(stack: LiveStack) -> None:
    res = stream(stack, clip([("low_tone", 3.0)], seed=2))
    assert res.error is None and res.captions, res.table()
    assert res.ended.last_event_id == res.captions[-1].event_id


def test_44k1_stereo_stream_is_resampled_and_captioned_like_16k_mono(
    stack: LiveStack, two_part: np.ndarray
) -> None:
    mono16 = stream(stack, two_part, interim_results=False)
    hi = resample_poly(two_part.astype(np.float64), 441, 160)
    stereo = np.stack([hi, hi], axis=1).reshape(-1)  # interleaved L R
    frames = 4410  # 100 ms at 44.1 kHz

    def reqs():  # type: ignore[no-untyped-def]
        yield config(sample_rate_hz=44100, channels=2, interim_results=False)
        for i, k in enumerate(range(0, len(hi), frames)):
            yield audio_req(float_to_pcm16_bytes(stereo[2 * k : 2 * (k + frames)]), i + 1)

    res = collect(stack.stub.StreamCaptions(reqs(), timeout=STREAM_TIMEOUT_S))
    for r in (mono16, res):
        assert r.error is None and r.kinds()[-1] == "ended", r.table()
        assert all(c.is_final for c in r.captions), (
            "interim_results=False must send finals only\n" + r.table()
        )
    assert res.started.effective_config.sample_rate_hz == 44100 and res.started.effective_config.channels == 2
    assert res.ended.total_audio_seconds == pytest.approx(20.0, abs=0.05)
    assert [
        (c.segment_id, round(c.window_start_seconds, 1), round(c.window_end_seconds, 1)) for c in res.finals
    ] == [
        (c.segment_id, round(c.window_start_seconds, 1), round(c.window_end_seconds, 1))
        for c in mono16.finals
    ]
    assert [c.text for c in res.finals] == [c.text for c in mono16.finals], (
        f"44.1k:\n{res.table()}\n16k:\n{mono16.table()}"
    )
    check_finals_name_tone_then_noise(res)


def wav_bytes(audio: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def test_caption_offline_wav_and_raw_pcm(stack: LiveStack) -> None:
    tone = clip([("high_tone", 5.0)], seed=3)
    noise = clip([("white_noise", 5.0)], seed=4)
    r1 = stack.stub.Caption(
        captions_pb2.CaptionRequest(encoded_audio=wav_bytes(tone), request_id="a"), timeout=60
    )
    assert types_in_caption(r1.text) == ["high_tone"], r1.text
    assert r1.request_id == "a" and r1.audio_seconds == pytest.approx(5.0, abs=0.01)
    assert r1.generated_tokens > 0 and r1.finish_reason == captions_pb2.CaptionResponse.STOP
    raw = captions_pb2.RawAudio(
        data=float_to_pcm16_bytes(noise), sample_rate_hz=16000, encoding=captions_pb2.LINEAR16
    )
    r2 = stack.stub.Caption(captions_pb2.CaptionRequest(raw_audio=raw), timeout=60)
    assert types_in_caption(r2.text) == ["white_noise"], r2.text


def test_batch_caption_one_garbage_item_fails_alone(stack: LiveStack) -> None:
    tone = clip([("low_tone", 4.0)], seed=5)
    noise = clip([("pink_noise", 4.0)], seed=6)
    items = [
        captions_pb2.CaptionRequest(encoded_audio=wav_bytes(tone), request_id="tone"),
        captions_pb2.CaptionRequest(encoded_audio=b"\x00garbage, not an audio file" * 10, request_id="junk"),
        captions_pb2.CaptionRequest(
            raw_audio=captions_pb2.RawAudio(data=float_to_pcm16_bytes(noise), sample_rate_hz=16000),
            request_id="noise",
        ),
    ]
    resp = stack.stub.BatchCaption(captions_pb2.BatchCaptionRequest(items=items), timeout=120)
    assert [(r.index, r.request_id) for r in resp.results] == [(0, "tone"), (1, "junk"), (2, "noise")]
    assert [r.WhichOneof("outcome") for r in resp.results] == ["caption", "error", "caption"]
    err = resp.results[1].error
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], err
    assert err.message and "internal error" not in err.message, err
    assert types_in_caption(resp.results[0].caption.text) == ["low_tone"], resp.results[0].caption.text
    assert types_in_caption(resp.results[2].caption.text) == ["pink_noise"], resp.results[2].caption.text
