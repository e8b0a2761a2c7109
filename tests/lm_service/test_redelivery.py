"""At-least-once delivery into the LM worker, directly against Redis: duplicate publications and
redeliveries give exactly one caption event per planned caption; poison entries are
dead-lettered with a reason and reported, and the session goes on."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import pytest
import redis
import torch

import lm_service.reader
from lm_service.engines.base import CaptionEngine, CaptionRequest, CaptionResult
from lm_service.ownership import OwnedSession
from lm_service.reader import PublicationReader
from lm_service.schedule import CaptionSchedule, ScheduleState
from lm_service.worker import GROUP, LMWorker, WorkerLimits
from services.transport import keys
from services.transport.keys import TransportDefaults
from services.transport.streams import StreamClient
from services.wire.settings import SessionSettings, StreamSettings, settings_to_hash
from services.wire.tokens import PAYLOAD_FIELD, TokenMessage, encode_tokens

SID = "redelivery-1"
SETTINGS = SessionSettings(window_seconds=10.0, hop_seconds=2.0, interim_results=True, max_new_tokens=6)
DEFAULTS = TransportDefaults(lease_ttl_ms=60_000, heartbeat_ms=1_000, claim_min_idle_ms=100, block_ms=20)
STEP_TIMEOUT_S = 60.0
# One publication per read: every publication gets its own interim, so the expected events are
# exactly the schedule's (coalescing is tested in test_coalescing.py).
ONE_AT_A_TIME = WorkerLimits(coalesce=1)
PER_PUB = 10  # tokens per publication: 2 s at 5 Hz


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    c.close()


def register(client: redis.Redis, sid: str = SID) -> None:
    """What LiveGateway.create does in Redis."""
    client.hset(keys.session_config(sid), mapping=settings_to_hash(StreamSettings(session=SETTINGS)))
    client.zadd(keys.ACTIVE_SESSIONS, {sid: int(time.time() * 1000)})


def messages(n: int, hidden: int, seed: int = 0) -> list[TokenMessage]:
    """n publications of 10 final tokens each (20 s for n = 10), the last one ending the stream."""
    g = torch.Generator().manual_seed(seed)
    return [
        TokenMessage(
            seq=s,
            token_start=PER_PUB * (s - 1),
            tokens=torch.randn(PER_PUB, hidden, generator=g),
            num_final=PER_PUB,
            stream_seconds=2.0 * s,
            end_of_stream=s == n,
        )
        for s in range(1, n + 1)
    ]


def planned(msgs: list[TokenMessage]) -> list[tuple[int, int, float, float, bool]]:
    sched = CaptionSchedule(SETTINGS)
    out = []
    for m in msgs:
        sched.ingest(m)
        out += [
            (p.segment_id, p.revision, p.window_start_seconds, p.window_end_seconds, p.is_final)
            for p in sched.advance(m)
        ]
    return out


class Publisher:
    def __init__(self, client: redis.Redis) -> None:
        self.streams = StreamClient(client)

    def __call__(self, *items: TokenMessage | dict[str, bytes | str]) -> list[str]:
        ids = []
        for it in items:
            fields = {PAYLOAD_FIELD: encode_tokens(SID, it)} if isinstance(it, TokenMessage) else it
            ids.append(self.streams.add(keys.session_tokens(SID), fields, maxlen=1000, counter="tokens"))
        return ids


def events(client: redis.Redis, sid: str = SID) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(keys.session_captions(sid))
    ]


def caption_rows(evs: list[dict[str, str]]) -> list[tuple[int, int, float, float, bool]]:
    return [
        (
            int(e["segment_id"]),
            int(e["revision"]),
            float(e["window_start"]),
            float(e["window_end"]),
            e["is_final"] == "1",
        )
        for e in evs
        if e.get("type", "caption") == "caption"
    ]


def run_until(worker: LMWorker, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        worker.step(block_ms=20)


def drained(client: redis.Redis) -> Callable[[], bool]:
    """Every entry of the token stream delivered to the group and acked."""
    stream = keys.session_tokens(SID)

    def check() -> bool:
        groups = {g["name"].decode(): g for g in client.xinfo_groups(stream)} if client.exists(stream) else {}
        g = groups.get(GROUP)
        last = client.xrevrange(stream, count=1)
        return bool(g and last and g["last-delivered-id"] == last[0][0] and g["pending"] == 0)

    return check


def ended(client: redis.Redis) -> Callable[[], bool]:
    return lambda: any(e.get("type") == "end" for e in events(client))


@pytest.mark.parametrize("page", [200, 3, 1])
def test_a_new_owner_rebuilds_the_tokens_from_the_stream_in_pages(
    client: redis.Redis, page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay reads the token stream a page at a time (a long session's stream is never one
    reply) and holds exactly the tokens of ingesting every applied publication in order."""
    monkeypatch.setattr(lm_service.reader, "REPLAY_PAGE", page)
    msgs = messages(7, 8, seed=5)
    for m in msgs:
        client.xadd(keys.session_tokens(SID), {PAYLOAD_FIELD: encode_tokens(SID, m)})
    applied = 6  # the earlier owner applied seq 1..6; 7 is still to come
    want = CaptionSchedule(SETTINGS)
    for m in msgs[:applied]:
        want.ingest(m)
    got = CaptionSchedule(SETTINGS, ScheduleState(last_seq=applied))
    session = OwnedSession(SID, got, keys.session_tokens(SID))
    reader = PublicationReader(StreamClient(client), "w", DEFAULTS)
    reader.replay_applied(session)
    end = PER_PUB * applied
    start = end - 3 * SETTINGS.window_tokens  # what the schedule retains
    torch.testing.assert_close(got.window(max(0, start), end), want.window(max(0, start), end))
    assert got.stream_seconds == want.stream_seconds == msgs[applied - 1].stream_seconds


def test_replay_of_a_trimmed_stream_starts_at_the_first_self_contained_publication(
    client: redis.Redis,
) -> None:
    """Publications keep tentative tokens sent earlier in their encoder window (tentative_start):
    when the stream's head was trimmed, the first retained ones refer to tokens no longer there.
    The new owner skips them and holds, from the next window's first publication on, exactly
    what an owner that saw everything holds."""
    g = torch.Generator().manual_seed(9)

    def pub(seq: int, start: int, n: int, final: int, tentative_start: int = 0) -> TokenMessage:
        return TokenMessage(
            seq, start, torch.randn(n, 8, generator=g), final, 0.2 * seq, False, 0, 0, 0, tentative_start
        )

    msgs = [
        pub(1, 0, 4, 0),  # window 0: tentative [0, 4)
        pub(2, 0, 3, 0, tentative_start=2),  # keeps [0, 2) of seq 1
        pub(3, 0, 3, 0, tentative_start=3),  # keeps [0, 3)
        pub(4, 0, 6, 6),  # window 0 closes: finals [0, 6)
        pub(5, 6, 2, 0),  # window 1: tentative [6, 8)
        pub(6, 6, 2, 0, tentative_start=7),  # keeps [6, 7)
    ]
    full = CaptionSchedule(SETTINGS)
    for m in msgs:
        full.ingest(m)
    for m in msgs[1:]:  # seq 1 was trimmed away
        client.xadd(keys.session_tokens(SID), {PAYLOAD_FIELD: encode_tokens(SID, m)})
    got = CaptionSchedule(SETTINGS, ScheduleState(last_seq=6))
    reader = PublicationReader(StreamClient(client), "w", DEFAULTS)
    reader.replay_applied(OwnedSession(SID, got, keys.session_tokens(SID)))
    torch.testing.assert_close(got.window(0, 9), full.window(0, 9))


def test_duplicates_and_redelivery_after_a_crash_give_each_caption_once(
    client: redis.Redis, engine: CaptionEngine
) -> None:
    register(client)
    msgs = messages(10, engine.hidden_size)
    pub = Publisher(client)
    pub(msgs[0], msgs[1], msgs[1], msgs[2])  # seq 2 published twice (an encoder retry)
    w1 = LMWorker(client, engine, worker_id="w1", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    run_until(w1, drained(client), "w1 to apply seq 1-3")
    assert client.hget(keys.session_state(SID), "last_seq") == b"3"

    # w1 reads seq 4 and dies before applying it: the entry stays pending (unacked) under w1.
    pub(msgs[3])
    [entry] = w1.streams.read_group(GROUP, "w1", {keys.session_tokens(SID): ">"}, count=10, block_ms=None)
    assert client.xpending(keys.session_tokens(SID), GROUP)["pending"] == 1
    client.delete(keys.session_lease(SID))  # its lease runs out

    w2 = LMWorker(client, engine, worker_id="w2", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    pub(msgs[4], msgs[5], msgs[6], msgs[6], msgs[7], msgs[8], msgs[8], msgs[9])
    run_until(w2, ended(client), "w2 to end the session")
    assert not client.exists(keys.session_tokens(SID)), "an ended session's token stream is deleted"
    evs = events(client)
    rows = caption_rows(evs)
    assert rows == planned(msgs), rows
    assert len({(r[0], r[1]) for r in rows}) == len(rows)
    assert [e["type"] for e in evs].count("end") == 1 and evs[-1]["type"] == "end"
    assert not [e for e in evs if e.get("type") == "error"], evs
    assert client.xlen(keys.DEAD_LETTERS) == 0
    assert not client.zscore(keys.ACTIVE_SESSIONS, SID), "an ended session leaves the active set"


def test_redelivery_of_an_entry_read_by_the_same_worker_is_applied_once(
    client: redis.Redis, engine: CaptionEngine
) -> None:
    """An entry read but not processed (e.g. the step failed) is re-read from the worker's own PEL."""
    register(client)
    msgs = messages(5, engine.hidden_size, seed=1)
    pub = Publisher(client)
    w = LMWorker(client, engine, worker_id="w1", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    w.adopt_free_sessions()
    pub(*msgs[:3])
    w.streams.read_group(
        GROUP, "w1", {keys.session_tokens(SID): ">"}, count=2, block_ms=None
    )  # seq 1, 2 pending
    pub(*msgs[3:])
    run_until(w, ended(client), "the end of the session")
    assert caption_rows(events(client)) == planned(msgs)


def test_a_zombie_worker_after_takeover_does_not_swallow_an_entry(
    client: redis.Redis, engine: CaptionEngine
) -> None:
    register(client)
    msgs = messages(5, engine.hidden_size, seed=2)
    pub = Publisher(client)
    w1 = LMWorker(client, engine, worker_id="w1", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    pub(msgs[0])
    run_until(w1, drained(client), "w1 to apply seq 1")
    client.delete(keys.session_lease(SID))  # w1 stalls past its lease...
    w2 = LMWorker(client, engine, worker_id="w2", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    w2.adopt_free_sessions()  # ...and w2 takes the session over
    assert w2.sessions and SID in w2.sessions
    pub(msgs[1])
    # w1 wakes up, still believing it owns the session, reads seq 2, captions it, and finds at
    # apply time that its lease is gone.
    run_until(w1, lambda: SID not in w1.sessions, "w1 to notice it lost the lease")
    pub(*msgs[2:])
    run_until(w2, ended(client), "w2 to end the session")
    assert caption_rows(events(client)) == planned(msgs)
    assert not client.exists(keys.session_tokens(SID)), "an ended session's token stream is deleted"


def test_poison_entries_are_dead_lettered_reported_and_the_session_goes_on(
    client: redis.Redis, engine: CaptionEngine
) -> None:
    register(client)
    msgs = messages(6, engine.hidden_size, seed=3)
    other = encode_tokens("someone-else", messages(1, engine.hidden_size)[0])
    pub = Publisher(client)
    ids = pub(
        msgs[0],
        msgs[1],
        {PAYLOAD_FIELD: b"\xff\xfe garbage \x00\x01"},
        msgs[2],
        {PAYLOAD_FIELD: other},
        msgs[3],
        msgs[4],
        msgs[5],
    )
    w = LMWorker(client, engine, worker_id="w1", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    run_until(w, ended(client), "the end of the session")

    dead = [(i.decode(), {k.decode(): v for k, v in f.items()}) for i, f in client.xrange(keys.DEAD_LETTERS)]
    assert [d["id"].decode() for _, d in dead] == [ids[2], ids[4]], dead
    for _, d in dead:
        assert d["stream"].decode() == keys.session_tokens(SID) and d["group"].decode() == GROUP
        assert d["reason"].strip(), d
    assert dead[0][1]["f:pb"] == b"\xff\xfe garbage \x00\x01"
    assert b"unparseable" in dead[0][1]["reason"], dead[0][1]["reason"]
    assert b"someone-else" in dead[1][1]["reason"], dead[1][1]["reason"]
    assert StreamClient(client).counters(keys.DEAD_LETTERS).get("deadletters") == 2

    evs = events(client)
    errors = [e for e in evs if e.get("type") == "error"]
    assert len(errors) == 2 and all(e["fatal"] == "0" for e in errors), errors
    assert "unparseable" in errors[0]["message"] and "someone-else" in errors[1]["message"]
    # Everything else was captioned as if the poison had not been there, and the session ended normally.
    assert caption_rows(evs) == planned(msgs)
    assert evs[-1]["type"] == "end" and evs[-1]["reason"] == "end_of_stream"
    assert not client.exists(keys.session_tokens(SID)), "an ended session's token stream is deleted"


class FlakyEngine:
    """Fails every caption request whose window holds exactly ``bad_start_token`` tokens."""

    def __init__(self, inner: CaptionEngine, bad_start_token: int) -> None:
        self.inner, self.bad = inner, bad_start_token
        self.name = "flaky"

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def submit(self, requests: Sequence[CaptionRequest]) -> list[Future[CaptionResult]]:
        out: list[Future[CaptionResult]] = []
        for r in requests:
            if int(r.audio_tokens.shape[0]) == self.bad:
                f: Future[CaptionResult] = Future()
                f.set_exception(RuntimeError("simulated device failure"))
                out.append(f)
            else:
                out += self.inner.submit([r])
        return out


def test_an_entry_that_keeps_failing_is_dead_lettered_after_max_deliveries(
    client: redis.Redis, engine: CaptionEngine
) -> None:
    register(client)
    msgs = messages(4, engine.hidden_size, seed=7)
    publish = Publisher(client)
    publish(*msgs)
    # seq 2's interim window holds 20 tokens (4 s); nothing else has exactly 20 tokens.
    flaky = FlakyEngine(engine, bad_start_token=20)
    w = LMWorker(client, flaky, worker_id="w1", defaults=DEFAULTS, limits=ONE_AT_A_TIME)  # type: ignore[arg-type]
    run_until(w, ended(client), "the end of the session")
    dead = client.xrange(keys.DEAD_LETTERS)
    assert len(dead) == 1
    record = {k.decode(): v.decode(errors="replace") for k, v in dead[0][1].items()}
    assert "captioning failed 3 times" in record["reason"] and record["deliveries"] == "3"
    evs = events(client)
    assert any(e.get("type") == "error" and "skipped" in e["message"] for e in evs)
    windows = [(r[2], r[3]) for r in caption_rows(evs)]
    assert (0.0, 4.0) not in windows and (0.0, 2.0) in windows and (0.0, 6.0) in windows
    assert evs[-1]["type"] == "end"


def encoder_like(windows: int, hidden: int, seed: int = 0) -> list[TokenMessage]:
    """Publications shaped like the streaming encoder's, 1 s apart: four per 4 s encoder window
    with a growing tentative tail, each keeping all but the last 2 tokens it sent before
    (tentative_start), then the window's finals."""
    g = torch.Generator().manual_seed(seed)
    out: list[TokenMessage] = []
    for k in range(windows):
        w0 = 20 * k
        for j in range(1, 5):
            end = w0 + 5 * j
            at = w0 if j == 1 else end - 7
            n = end - at
            out.append(
                TokenMessage(
                    len(out) + 1,
                    w0,
                    torch.randn(n, hidden, generator=g),
                    0,
                    end / 5,
                    False,
                    0,
                    0,
                    0,
                    at if j > 1 else 0,
                )
            )
        out.append(TokenMessage(len(out) + 1, w0, torch.randn(20, hidden, generator=g), 20, (w0 + 20) / 5))
    last = out[-1]
    out[-1] = TokenMessage(last.seq, last.token_start, last.tokens, last.num_final, last.stream_seconds, True)
    return out


def test_applied_publications_are_trimmed_and_a_takeover_still_captions_the_same(
    client: redis.Redis, engine: CaptionEngine
) -> None:
    """The owner trims the token stream to what a replay needs (so it stays a few windows long
    however long the session), and a new owner that replays the trimmed stream writes exactly
    the captions of an owner that never stopped."""
    msgs = encoder_like(12, engine.hidden_size, seed=2)  # 60 publications, 48 s
    half = 33

    def publish(sid: str, part: list[TokenMessage]) -> None:
        for m in part:
            client.xadd(keys.session_tokens(sid), {PAYLOAD_FIELD: encode_tokens(sid, m)})

    def done(sid: str) -> Callable[[], bool]:
        return lambda: any(e.get("type") == "end" for e in events(client, sid))

    def rows(sid: str) -> list[tuple[str, ...]]:
        return [
            (e["segment_id"], e["revision"], e["window_start"], e["window_end"], e["is_final"], e["text"])
            for e in events(client, sid)
            if e.get("type", "caption") == "caption"
        ]

    register(client, "whole")
    publish("whole", msgs)
    run_until(
        LMWorker(client, engine, worker_id="a", defaults=DEFAULTS, limits=ONE_AT_A_TIME), done("whole"), "end"
    )

    sid = "taken-over"
    register(client, sid)
    publish(sid, msgs[:half])
    w1 = LMWorker(client, engine, worker_id="w1", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    applied = lambda: client.hget(keys.session_state(sid), "last_seq") == str(half).encode()  # noqa: E731
    run_until(w1, applied, "w1 to apply the first publications")
    kept = client.xlen(keys.session_tokens(sid))
    assert kept <= 20, f"{kept} of {half} publications still in the stream"  # ~3 windows + a radix node
    client.delete(keys.session_lease(sid))  # w1 dies
    w2 = LMWorker(client, engine, worker_id="w2", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    publish(sid, msgs[half:])
    run_until(w2, done(sid), "w2 to end the session")
    assert rows(sid) == rows("whole") and len(rows("whole")) > 10
    assert not [e for e in events(client, sid) if e.get("type") == "error"]
