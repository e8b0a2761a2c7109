"""Encoder sessions without Redis: a publication that fails to reach Redis is sent again, in order,
before anything new; a duplicate push that carries the end still ends the session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_service.backends import TorchBackend
from encoder_service.batcher import EncoderBatcher
from encoder_service.sessions import DEFAULT_TOLERANCE, EncoderSessions
from services.model.modeling import MiDashengLM
from services.wire.tokens import decode_tokens


class FlakySink:
    def __init__(self) -> None:
        self.fail_next = 0
        self.got: list[bytes] = []

    def __call__(self, sid: str, payload: bytes) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("redis is down")
        self.got.append(payload)


def test_failed_publications_are_resent_in_order(encoder_model: MiDashengLM) -> None:
    batcher = EncoderBatcher(TorchBackend(encoder_model.audio_encoder))
    batcher.start()
    sink = FlakySink()
    sessions = EncoderSessions(encoder_model, batcher, sink)
    try:
        sessions.open("s", 1.0)
        audio = (0.1 * np.random.default_rng(0).standard_normal(16000 * 14)).astype(np.float32)
        chunks = [audio[i : i + 8000] for i in range(0, audio.size, 8000)]
        seq = 0
        for k, chunk in enumerate(chunks):
            if k == 5:
                sink.fail_next = 2  # this push's publication and the next one's retry fail
            seq += 1
            try:
                sessions.push("s", seq, chunk)
            except ConnectionError:
                pass
        sink.fail_next = 1
        with pytest.raises(ConnectionError):
            sessions.push("s", seq + 1, np.zeros(0, np.float32), end_of_stream=True)
        sessions.push("s", seq + 1, np.zeros(0, np.float32), end_of_stream=True)  # resent by the client
    finally:
        batcher.stop()
    msgs = [decode_tokens(p)[1] for p in sink.got]
    assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))  # no gap, no repeat
    assert msgs[-1].end_of_stream
    final_end = 0
    for m in msgs:  # final tokens continue exactly where the previous publication's ended
        assert m.token_start == final_end
        final_end += m.num_final
    assert final_end == encoder_model.token_count(audio.size)


def publications(
    model: MiDashengLM, audio: np.ndarray, tolerance: float, hop: float = 1.0, push: float = 0.25
) -> list[bytes]:
    batcher = EncoderBatcher(TorchBackend(model.audio_encoder))
    batcher.start()
    got: list[bytes] = []
    sessions = EncoderSessions(model, batcher, lambda sid, payload: got.append(payload), tolerance=tolerance)
    try:
        sessions.open("s", hop)
        step = int(push * 16000)
        for seq, k in enumerate(range(0, audio.size, step), start=1):
            sessions.push("s", seq, audio[k : k + step])
        sessions.push("s", seq + 1, np.zeros(0, np.float32), end_of_stream=True)
    finally:
        batcher.stop()
    return got


@pytest.mark.parametrize("seed", [0, 1, 2, 3, -1])
def test_tentative_tolerance_changes_no_caption_and_sends_fewer_tokens(
    encoder_model: MiDashengLM, engine: object, seed: int
) -> None:
    """The default tolerance (DEFAULT_TOLERANCE, 1 % relative L2 per token) against exact re-sends:
    every caption of the demo model, interim and final, is the same on changing scenes (four
    sounds of 6 s) and a steady one (seed -1); fewer tokens are sent."""
    from lm_service.engines.base import CaptionRequest, caption_all
    from lm_service.schedule import CaptionSchedule
    from services.training.synth import SOUND_TYPES, render_sound
    from services.wire.settings import SessionSettings

    rng = np.random.default_rng(max(seed, 0))
    kinds = sorted(n for n in SOUND_TYPES if n != "silence")
    names = ["high_tone"] * 4 if seed < 0 else [kinds[i] for i in rng.integers(len(kinds), size=4)]
    audio = np.concatenate([render_sound(n, rng, 16000 * 6) for n in names]).astype(np.float32)

    def captions(tolerance: float) -> tuple[list[tuple[int, int, int, str]], int]:
        sched = CaptionSchedule(SessionSettings(window_seconds=10.0, hop_seconds=1.0))
        out, sent = [], 0
        for payload in publications(encoder_model, audio, tolerance):
            _, msg = decode_tokens(payload)
            sent += int(msg.tokens.shape[0])
            sched.ingest(msg)
            plans = sched.advance(msg)
            reqs = [CaptionRequest(sched.window(p.start_token, p.end_token)) for p in plans]
            for p, r in zip(plans, caption_all(engine, reqs, 120), strict=True):  # type: ignore[arg-type]
                out.append((p.segment_id, p.start_token, p.end_token, r.text))
        return out, sent

    exact, sent_exact = captions(0.0)
    tolerant, sent_tolerant = captions(DEFAULT_TOLERANCE)
    assert tolerant == exact, names
    assert sent_tolerant < sent_exact, (sent_tolerant, sent_exact)


def test_tolerant_publications_hold_what_the_encoder_computed_to_within_the_tolerance(
    encoder_model: MiDashengLM,
) -> None:
    """What the LM holds after each publication equals the exact tokens within 5 % per token (and
    exactly for final tokens)."""
    from lm_service.schedule import CaptionSchedule
    from services.wire.settings import SessionSettings

    audio = (0.2 * np.sin(np.arange(16000 * 14) * 0.05)).astype(np.float32)
    exact = [decode_tokens(p)[1] for p in publications(encoder_model, audio, 0.0)]
    tolerant = [decode_tokens(p)[1] for p in publications(encoder_model, audio, 0.05)]
    assert [m.seq for m in exact] == [m.seq for m in tolerant]
    a = CaptionSchedule(SessionSettings())
    b = CaptionSchedule(SessionSettings())
    skipped = 0
    for me, mt in zip(exact, tolerant, strict=True):
        a.ingest(me)
        b.ingest(mt)
        skipped += mt.tentative_at - mt.final_end
        n_final, n_total = me.final_end, me.total_end
        assert (mt.final_end, mt.total_end) == (n_final, n_total)
        lo = max(a._base, b._base)
        held_a, held_b = a.window(lo, n_total), b.window(lo, n_total)
        final = n_final - lo
        assert torch.equal(held_a[:final], held_b[:final])
        rel = (held_a[final:] - held_b[final:]).norm(dim=1) / held_b[final:].norm(
            dim=1
        )  # as the encoder measures
        assert bool((rel <= 0.05 + 1e-6).all()), rel.max()
    assert skipped > 0  # the tolerance did skip tentative tokens


def test_new_sessions_are_refused_while_the_device_is_behind(encoder_model: MiDashengLM) -> None:
    from services.errors import ResourceExhausted

    batcher = EncoderBatcher(TorchBackend(encoder_model.audio_encoder))
    sessions = EncoderSessions(encoder_model, batcher, lambda sid, payload: None, max_lag_s=2.0)
    sessions.open("early")
    batcher.wait_s = 3.0  # the last batch's windows waited 3 s for the device
    with pytest.raises(ResourceExhausted, match="behind") as refused:
        sessions.open("late")
    assert refused.value.retry_after
    assert sessions.open("early", reattach_only=True) == (0, True)  # a session it holds stays
    batcher.wait_s = 0.1
    sessions.open("late")
