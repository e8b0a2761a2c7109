"""Caption schedule (pure): what is captioned when, for any window/hop, with final tokens arriving in
bursts of a whole 10.08 s encoder window as the encoder service publishes them."""

from __future__ import annotations

import pytest
import torch

from lm_service.schedule import CaptionSchedule
from services.constants import SEGMENT, SLIDING
from services.wire.settings import SessionSettings
from services.wire.tokens import TokenMessage


def run(
    window: float, hop: float, seconds: int, interim_window: str = SEGMENT
) -> list[tuple[int, int, int, int, bool]]:
    sched = CaptionSchedule(
        SessionSettings(window_seconds=window, hop_seconds=hop, interim_window=interim_window)
    )
    out, published, seq = [], 0, 0
    hop_tokens = round(hop * 5)
    for total in [*range(hop_tokens, seconds * 5, hop_tokens), seconds * 5]:  # a hop each, then the end
        end = total == seconds * 5
        final = total if end else total // 50 * 50  # an encoder window closes every ~50 tokens
        seq += 1
        msg = TokenMessage(
            seq=seq,
            token_start=published,
            tokens=torch.randn(total - published, 3),
            num_final=final - published,
            stream_seconds=total / 5,
            end_of_stream=end,
        )
        sched.ingest(msg)
        for p in sched.advance(msg):
            assert sched.window(p.start_token, p.end_token).shape[0] == p.end_token - p.start_token
            out.append((p.segment_id, p.revision, p.start_token, p.end_token, p.is_final))
        published = final
    return out


@pytest.mark.parametrize("interim_window", [SEGMENT, SLIDING])
@pytest.mark.parametrize("window,hop", [(10.0, 2.0), (3.0, 1.0), (1.0, 0.2), (30.0, 5.0), (4.0, 4.0)])
def test_finals_tile_the_stream_and_every_window_is_retained(
    window: float, hop: float, interim_window: str
) -> None:
    events = run(window, hop, 61, interim_window)
    finals = [(s, a, b) for s, _, a, b, f in events if f]
    w = round(window * 5)
    assert [s for s, _, _ in finals] == list(range(len(finals)))
    assert finals[0][1] == 0 and finals[-1][2] == 61 * 5
    assert all(prev[2] == nxt[1] for prev, nxt in zip(finals, finals[1:], strict=False))
    assert all(b - a == w for _, a, b in finals[:-1])
    for seg in {s for s, *_ in events}:  # revisions count up within a segment, the final last
        revs = [(r, f) for s, r, _, _, f in events if s == seg]
        assert [r for r, _ in revs] == list(range(len(revs))) and revs[-1][1]
    interims = [(s, a, b) for s, _, a, b, f in events if not f]
    if interim_window == SLIDING:
        assert all(b - a == min(w, b) for _, a, b in interims)  # the last `window` seconds
    else:  # from the open segment's start to the newest audio (past its end while its tokens are tentative)
        assert all(a == s * w and b > a for s, a, b in interims)
        for seg in {s for s, *_ in interims}:
            ends = [b for s, _, b in interims if s == seg]
            assert ends == sorted(ends)
