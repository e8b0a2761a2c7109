"""LiveSession.feed on its own: a chunk whose push to the encoder failed and is sent again (same seq)
reaches the encoder once, exactly as if the push had never failed, even through a resampler."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from services.audio.pcm import PcmConverter
from services.errors import InvalidArgument
from services.gateway.live import GatewayLimits, LiveSession
from services.wire.settings import StreamSettings


class PushFailed(Exception):
    pass


class FlakyEncoder:
    def __init__(self, fail_seqs: set[int]) -> None:
        self.fail_seqs = fail_seqs
        self.pushed: list[tuple[int, np.ndarray]] = []

    def push(self, sid: str, seq: int, samples: np.ndarray, end_of_stream: bool = False) -> None:
        if seq in self.fail_seqs:
            self.fail_seqs.discard(seq)
            raise PushFailed("encoder unavailable")
        self.pushed.append((seq, samples.copy()))


def chunks(rate: int, n: int, seconds: float = 0.1) -> list[bytes]:
    rng = np.random.default_rng(0)
    size = int(rate * seconds)
    return [(rng.standard_normal(size) * 3000).astype("<i2").tobytes() for _ in range(n)]


@pytest.mark.parametrize("rate", [16000, 44100])
def test_a_resent_chunk_after_a_failed_push_is_pushed_once_and_unchanged(rate: int) -> None:
    enc = FlakyEncoder({3, 5})
    session = LiveSession(
        SimpleNamespace(limits=GatewayLimits(), encoder=enc),  # type: ignore[arg-type]
        "s",
        StreamSettings(sample_rate=rate),
    )
    data = chunks(rate, 8)
    for i, d in enumerate(data, start=1):
        try:
            session.feed(d, i)
        except PushFailed:
            assert session.audio_seq == i - 1  # not counted
            session.feed(d, i)  # the client sends it again
    assert [s for s, _ in enc.pushed] == list(range(1, 9))
    ref = PcmConverter(rate)
    expected = [ref.convert(d) for d in data]
    for (_, got), want in zip(enc.pushed, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert session.samples == sum(e.size for e in expected)


def test_a_resent_chunk_must_carry_the_same_bytes() -> None:
    enc = FlakyEncoder({2})
    session = LiveSession(
        SimpleNamespace(limits=GatewayLimits(), encoder=enc),  # type: ignore[arg-type]
        "s",
        StreamSettings(sample_rate=44100),
    )
    a, b, c = chunks(44100, 3)
    session.feed(a, 1)
    with pytest.raises(PushFailed):
        session.feed(b, 2)
    with pytest.raises(InvalidArgument, match="seq 2 was sent again with different bytes"):
        session.feed(c, 2)
    session.feed(b, 2)
    assert [s for s, _ in enc.pushed] == [1, 2]
