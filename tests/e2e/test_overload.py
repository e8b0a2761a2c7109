"""Admission: new streams are refused with RESOURCE_EXHAUSTED and a retry hint while the caption
workers are full, the streams already admitted are captioned completely, and a freed worker
takes new streams again."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import redis

from lm_service.worker import WorkerLimits
from services.rpc import RETRY_AFTER_MS
from services.transport import keys
from services.wire.load import LoadReport
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
    requests_for,
)

CAPACITY = 2


def wait_for_report(url: str, sessions: int, timeout: float = 20.0) -> None:
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reports = [LoadReport.from_text(v.decode()) for v in client.hgetall(keys.LM_WORKERS).values()]
            if reports and sum(r.sessions for r in reports) == sessions:
                return
            time.sleep(0.1)
        raise AssertionError(f"the LM workers never reported {sessions} sessions")
    finally:
        client.close()


def test_streams_beyond_capacity_are_refused_and_the_admitted_ones_finish(
    make_stack: Callable[..., LiveStack],
) -> None:
    stack = make_stack(lm_limits=WorkerLimits(max_sessions=CAPACITY))
    audio = clip([("low_tone", 2.0), ("white_noise", 2.0)], seed=31)
    feeders = [Feeder() for _ in range(CAPACITY)]
    calls = []
    for f in feeders:  # twice the capacity is asked for: the first two are admitted and held open
        f.put(config())
        calls.append(stack.stub.StreamCaptions(iter(f), timeout=STREAM_TIMEOUT_S))
    started = [next(c) for c in calls]
    assert all(s.WhichOneof("response") == "started" for s in started)
    wait_for_report(stack.redis_url, CAPACITY)

    for _ in range(CAPACITY):
        refused = collect(stack.stub.StreamCaptions(requests_for(audio), timeout=CALL_TIMEOUT_S))
        assert refused.error is not None and refused.error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in" in (refused.error.details() or ""), refused.error.details()
        trailers = dict(refused.error.trailing_metadata() or ())
        assert int(trailers[RETRY_AFTER_MS]) > 0

    for f in feeders:  # the admitted streams send their audio and finish
        f.put(*[audio_req(d, i + 1) for i, d in enumerate(pcm_chunks(audio))])
        f.close()
    results = []
    for c in calls:
        rest = collect(c)
        assert rest.error is None, rest.table()
        results.append(rest)
    for r in results:
        segments = [e.segment_id for e in r.finals]
        assert segments == sorted(set(segments)) and segments, r.table()  # every final once, in order
        assert r.ended.total_audio_seconds == pytest.approx(4.0, abs=0.05)

    wait_for_report(stack.redis_url, 0)  # the worker is free again: a new stream is admitted
    again = collect(stack.stub.StreamCaptions(requests_for(np.asarray(audio)), timeout=STREAM_TIMEOUT_S))
    assert again.error is None and again.finals, again.table()
