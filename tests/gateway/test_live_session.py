"""LiveSession.feed on its own: client chunks reach the encoder in contiguous ranges, about one
push per hop, exactly once and unchanged (even through a resampler), also when a push fails and
is tried again; a chunk sent again must carry the same bytes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from services.audio.pcm import PcmConverter
from services.errors import InvalidArgument
from services.gateway.live import GatewayLimits, LiveSession
from services.wire.settings import SessionSettings, StreamSettings


class PushFailed(Exception):
    pass


class Recorder:
    """An EncoderLink that records pushes; the pushes numbered in ``fail_calls`` fail (once each)."""

    def __init__(self, fail_calls: set[int]) -> None:
        self.fail_calls, self.calls = fail_calls, 0
        self.pushed: list[tuple[int, int, np.ndarray, bool]] = []  # (first seq, last seq, samples, end)

    def push(
        self, sid: str, seq: int, samples: np.ndarray, end_of_stream: bool = False, first_seq: int = 0
    ) -> None:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise PushFailed("encoder unavailable")
        self.pushed.append((first_seq or seq, seq, samples.copy(), end_of_stream))


def session_with(enc: Recorder, rate: int, hop: float = 1.0) -> LiveSession:
    settings = StreamSettings(sample_rate=rate, session=SessionSettings(hop_seconds=hop))
    gateway = SimpleNamespace(
        limits=GatewayLimits(), encoder=enc, mark_ended=lambda sid, seq: None, monitor=None
    )
    return LiveSession(gateway, "s", settings)  # type: ignore[arg-type]


def chunks(rate: int, n: int, seconds: float = 0.1) -> list[bytes]:
    rng = np.random.default_rng(0)
    size = int(rate * seconds)
    return [(rng.standard_normal(size) * 3000).astype("<i2").tobytes() for _ in range(n)]


@pytest.mark.parametrize("rate", [16000, 44100])
def test_chunks_reach_the_encoder_once_per_hop_in_order_even_when_a_push_fails(rate: int) -> None:
    enc = Recorder({2})
    session = session_with(enc, rate)
    data = chunks(rate, 35)  # 3.5 s at a 1 s hop
    for i, d in enumerate(data, start=1):
        try:
            session.feed(d, i)
        except PushFailed:
            assert session.audio_seq == i  # the chunk was accepted; its push is tried again
    session.finalize()
    ranges = [(a, b) for a, b, _, _ in enc.pushed]
    assert ranges[0][0] == 1 and ranges[-1][1] == 36 and enc.pushed[-1][3]  # the end is the resampler's tail
    assert all(b + 1 == a for (_, b), (a, _) in zip(ranges, ranges[1:], strict=False)), ranges
    assert len(enc.pushed) <= 5, ranges  # about one push per hop (and the end), not one per chunk
    ref = PcmConverter(rate)
    expected = np.concatenate([*(ref.convert(d) for d in data), ref.flush()])
    np.testing.assert_array_equal(np.concatenate([s for _, _, s, _ in enc.pushed]), expected)
    assert session.samples == expected.size


def test_a_push_happens_when_the_audio_crosses_a_hop() -> None:
    enc = Recorder(set())
    session = session_with(enc, 16000, hop=0.5)
    for i, d in enumerate(chunks(16000, 10), start=1):
        session.feed(d, i)
    assert [(a, b) for a, b, _, _ in enc.pushed] == [(1, 5), (6, 10)]  # at 0.5 s and 1.0 s


def test_a_resent_chunk_must_carry_the_same_bytes() -> None:
    enc = Recorder({1})  # the first push fails
    session = session_with(enc, 44100)
    data = chunks(44100, 20)
    failed = 0
    for i, d in enumerate(data, start=1):
        try:
            session.feed(d, i)
        except PushFailed:
            failed = i  # its push was due (about 1 s of audio) and failed
            break
    assert failed and not enc.pushed
    with pytest.raises(InvalidArgument, match=f"seq {failed} was sent again with different bytes"):
        session.feed(data[failed], failed)
    session.feed(data[failed - 1], failed)  # the same chunk again: the pending push goes through
    assert [(a, b) for a, b, _, _ in enc.pushed] == [(1, failed)]
