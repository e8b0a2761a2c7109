"""Encoder sessions without Redis: a publication that fails to reach Redis is sent again, in order,
before anything new; a duplicate push that carries the end still ends the session."""

from __future__ import annotations

import numpy as np
import pytest

from encoder_service.backends import TorchBackend
from encoder_service.batcher import EncoderBatcher
from encoder_service.sessions import EncoderSessions
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
