"""Overload: when an LM worker falls behind, a session's superseded interims are skipped (only
its newest window is captioned), finals are never dropped or repeated, and interim lag stays
bounded instead of growing with the backlog."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import redis

from lm_service.engines.base import CaptionEngine, CaptionRequest, CaptionResult
from lm_service.worker import LMWorker, WorkerLimits
from services.transport import keys
from tests.lm_service.test_redelivery import (
    DEFAULTS,
    ONE_AT_A_TIME,
    PER_PUB,
    SID,
    Publisher,
    caption_rows,
    client,  # noqa: F401  (a fixture)
    ended,
    events,
    messages,
    planned,
    register,
    run_until,
)

DELAY_S = 0.1  # per engine call: a slow device


class SlowEngine:
    """Delegates to the real engine and holds every batch's results back for DELAY_S (one at a time)."""

    def __init__(self, inner: CaptionEngine) -> None:
        self.inner, self.name = inner, "slow"
        self._lock = threading.Lock()
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def submit(self, requests: Sequence[CaptionRequest]) -> list[Future[CaptionResult]]:
        inner = self.inner.submit(requests)
        outer: list[Future[CaptionResult]] = [Future() for _ in inner]

        def finish() -> None:
            with self._lock:  # the device does one batch at a time
                self.calls += 1
                time.sleep(DELAY_S)
            for i, o in zip(inner, outer, strict=True):
                o.set_result(i.result(60))

        threading.Thread(target=finish, daemon=True).start()
        return outer


def finals(evs: list[dict[str, str]]) -> list[tuple[int, float, float, str]]:
    return [
        (int(e["segment_id"]), float(e["window_start"]), float(e["window_end"]), e["text"])
        for e in evs
        if e.get("type", "caption") == "caption" and e["is_final"] == "1"
    ]


def test_publications_read_together_get_every_final_and_only_the_newest_interim(
    client: redis.Redis,  # noqa: F811
    engine: CaptionEngine,
) -> None:
    msgs = messages(10, engine.hidden_size, seed=21)
    register(client)
    publish = Publisher(client)
    publish(*msgs[:7])  # seven hops at once: the worker is behind
    w = LMWorker(client, engine, worker_id="w1", defaults=DEFAULTS)
    run_until(w, lambda: client.hget(keys.session_state(SID), "last_seq") == b"7", "seq 7 to be applied")
    rows = caption_rows(events(client))
    windows = [(seg, a, b) for seg, _rev, a, b, final in rows if final]
    assert windows == [(seg, a, b) for seg, _rev, a, b, final in planned(msgs[:7]) if final]  # segment 0's
    interims = [r for r in rows if not r[4]]
    assert interims == [(1, 0, 10.0, 14.0, False)]  # one interim: the newest window, segment 1 so far
    publish(*msgs[7:])
    run_until(w, ended(client), "the end")
    evs = events(client)
    coalesced = finals(evs)
    assert [e["type"] for e in evs].count("end") == 1
    assert len({(r[0], r[1]) for r in caption_rows(evs)}) == len(caption_rows(evs))  # nothing twice

    # The same publications one at a time give the same finals, word for word.
    client.flushall()
    register(client)
    Publisher(client)(*msgs)
    one = LMWorker(client, engine, worker_id="w2", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    run_until(one, ended(client), "the end (one at a time)")
    assert finals(events(client)) == coalesced
    assert len(caption_rows(events(client))) > len(caption_rows(evs))  # more interims without coalescing


def lag_run(r: redis.Redis, engine: CaptionEngine, limits: WorkerLimits) -> tuple[float, list[tuple]]:
    """Publish 40 hops 20 ms apart to a worker whose engine takes DELAY_S per call; returns the
    largest interim lag (event written - its window's publication) and the finals."""
    r.flushall()
    register(r)
    msgs = messages(40, engine.hidden_size, seed=22)
    publish = Publisher(r)
    published: dict[int, float] = {}
    slow = SlowEngine(engine)
    w = LMWorker(r, slow, worker_id="w", defaults=DEFAULTS, limits=limits)  # type: ignore[arg-type]
    stop = threading.Event()
    loop = threading.Thread(
        target=lambda: [w.step(block_ms=10) for _ in iter(stop.is_set, True)], daemon=True
    )
    loop.start()
    try:
        for m in msgs:
            publish(m)
            published[m.seq] = time.time()
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        while not ended(r)() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(10)
    lags = []
    for entry_id, raw in r.xrange(keys.session_captions(SID)):
        f = {k.decode(): v.decode() for k, v in raw.items()}
        if f.get("type", "caption") == "caption" and f["is_final"] == "0":
            seq = round(float(f["window_end"]) * 5 / PER_PUB)
            lags.append(int(entry_id.decode().split("-")[0]) / 1000 - published[seq])
    return max(lags), finals(events(r))


def test_interim_lag_stays_bounded_when_captioning_is_slower_than_the_audio(
    client: redis.Redis,  # noqa: F811
    engine: CaptionEngine,
) -> None:
    """40 hops arrive in 0.8 s; captioning each takes 0.1 s. Bound: 1.5 s (about a dozen engine
    calls), where one-at-a-time captioning falls seconds behind (the control run)."""
    lag, coalesced_finals = lag_run(client, engine, WorkerLimits())
    control_lag, control_finals = lag_run(client, engine, ONE_AT_A_TIME)
    assert coalesced_finals == control_finals and len(coalesced_finals) == 8  # 40 x 2 s = 80 s: 8 segments
    assert lag <= 1.5, lag
    assert control_lag > 2.0, control_lag  # the test can tell the difference
