"""Monitoring on the live stack: a rule on a demo-model sound fires once per onset (debounced),
alerts reach the stream, the tenant's alert stream and a real webhook receiver with a signature
that verifies; a failing receiver is retried then dead-lettered while captions keep flowing; each
alert's clip decodes to the audio of the window that fired; finals land in the history."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import redis
from aiohttp import web

from services.monitor.clips import ClipStore
from services.monitor.history import HistoryStore
from services.monitor.rules import Rule, SyncRuleStore
from services.monitor.webhook import WebhookLimits, verify_signature
from services.pb.midasheng.v1 import captions_pb2
from services.transport import keys
from services.transport.connect import connect_async
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    STREAM_TIMEOUT_S,
    Collected,
    Feeder,
    audio_req,
    clip,
    collect,
    config,
    pcm_chunks,
)

SR = 16000
# Each tone part spans two 10 s segments, so its onset holds past the 1 s debounce even when the
# LM coalesces interims under load (two finals at least).
SCENE = [("white_noise", 10.0), ("high_tone", 20.0), ("white_noise", 10.0), ("high_tone", 20.0)]
WEBHOOKS = WebhookLimits(
    allow_private=True, max_attempts=3, backoff_base_seconds=0.05, backoff_cap_seconds=0.1
)


@dataclass
class Receiver:
    """A webhook receiver on loopback answering ``status`` to every delivery."""

    status: int
    hits: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append((dict(request.headers), await request.read()))
        return web.Response(status=self.status)


@pytest.fixture
def receivers() -> Iterator[Callable[[int], Receiver]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    def make(status: int) -> Receiver:
        rec = Receiver(status)

        async def start() -> str:
            app = web.Application()
            app.router.add_post("/hook", rec.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            return f"http://127.0.0.1:{port}/hook"

        rec.url = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        return rec

    yield make
    for r in runners:
        asyncio.run_coroutine_threadsafe(r.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def run_async(redis_url: str, fn: Callable[..., object]) -> object:
    async def main() -> object:
        client = connect_async(redis_url)
        try:
            return await fn(client)  # type: ignore[misc]
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_a_rule_fires_once_per_onset_with_clip_webhook_and_history(
    make_stack: Callable[..., LiveStack], receivers: Callable[[int], Receiver]
) -> None:
    stack = make_stack(webhook_limits=WEBHOOKS)
    good, bad = receivers(200), receivers(500)
    r = redis.Redis.from_url(stack.redis_url)
    store = SyncRuleStore(r)
    store.put(
        "",
        Rule(
            "tone",
            "match",
            pattern="high tone",
            debounce_seconds=1.0,
            cooldown_seconds=0.0,
            webhook_url=good.url,
        ),
    )
    store.put(
        "",
        Rule(
            "noise",
            "match",
            pattern="white noise",
            finals_only=True,
            cooldown_seconds=0.0,
            webhook_url=bad.url,
        ),
    )
    secret = store.ensure_webhook_secret("")
    time.sleep(0.3)  # rules are read when the session starts

    audio = clip(SCENE, seed=5)
    reqs = [config(interim_results=True)] + [audio_req(d, i + 1) for i, d in enumerate(pcm_chunks(audio))]
    res = collect(stack.stub.StreamCaptions(iter(reqs), timeout=STREAM_TIMEOUT_S))
    assert res.error is None and res.kinds()[-1] == "ended", res.table()
    sid = res.responses[0].started.session_id
    assert res.ended.total_audio_seconds == pytest.approx(60.0, abs=0.05)  # captions kept flowing

    # Wait for the monitor to finish with the session's last events, and for every delivery to
    # have succeeded or been dead-lettered.
    def settled() -> bool:
        alerts = [a for a in _alerts(r) if a["stream"] == sid]
        tones = sum(a["rule_id"] == "tone" for a in alerts)
        noises = sum(a["rule_id"] == "noise" for a in alerts)
        dead = r.xlen(keys.monitor_webhook_deadletters(""))
        return tones >= 2 and noises >= 2 and len(good.hits) == tones and dead == noises

    deadline = time.monotonic() + 60
    while not settled():
        assert time.monotonic() < deadline, (_alerts(r), len(good.hits), len(bad.hits))
        time.sleep(0.2)

    alerts = [a for a in _alerts(r) if a["stream"] == sid]
    tones = [a for a in alerts if a["rule_id"] == "tone"]
    # Once per onset: one alert for each of the two tone parts (debounce and state: unit tests).
    assert len(tones) == 2, alerts
    assert 10.0 < tones[0]["window_end"] <= 30.0 and 40.0 < tones[1]["window_end"] <= 60.0, tones
    in_stream = [resp.alert for resp in res.responses if resp.WhichOneof("response") == "alert"]
    assert {a.alert_id for a in in_stream} <= {a["alert_id"] for a in alerts}

    # The webhook receiver got each tone alert, signed.
    assert len(good.hits) == 2
    for headers, body in good.hits:
        assert verify_signature(secret, headers["X-Midasheng-Signature"], body)
        assert json.loads(body)["rule_id"] == "tone"
    # The failing receiver: every noise alert tried max_attempts times, then dead-lettered.
    noises = [a for a in alerts if a["rule_id"] == "noise"]
    assert len(noises) >= 2 and len(bad.hits) == 3 * len(noises)
    dead = r.xrange(keys.monitor_webhook_deadletters(""))
    assert len(dead) == len(noises)

    # Each tone clip decodes to the audio of the window that fired it.
    for a in tones:
        wav = run_async(stack.redis_url, lambda c, a=a: ClipStore(c).get("", a["alert_id"]))
        assert isinstance(wav, bytes)
        with wave.open(io.BytesIO(wav)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2)
            got = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
        start, end = round(a["window_start"] * SR), round(a["window_end"] * SR)
        want = audio[start:end]
        assert got.size == want.size > 0
        assert np.max(np.abs(got - want)) < 2 / 32768

    # Finals are in the history, searchable by text.
    page = run_async(stack.redis_url, lambda c: HistoryStore(c).search("", text="high tone", stream=sid))
    texts = [e.text for e in page.entries if e.kind == "caption"]  # type: ignore[attr-defined]
    assert len(texts) >= 2 and all("high tone" in t.lower() for t in texts)
    kinds = {e.kind for e in page.entries}  # type: ignore[attr-defined]
    assert "alert" in kinds
    r.close()


def _alerts(r: redis.Redis) -> list[dict]:
    return [json.loads(f[b"alert"]) for _, f in r.xrange(keys.monitor_alerts(""))]


def test_questions_are_answered_and_can_change_mid_stream(stack: LiveStack) -> None:
    audio = clip([("high_tone", 6.0), ("low_tone", 6.0)], seed=9)
    chunks = pcm_chunks(audio)
    q = captions_pb2.Question(id="high", text="Is there a high tone?")
    feeder = Feeder()
    feeder.put(
        config(interim_results=True, questions=[q]), *[audio_req(d, i + 1) for i, d in enumerate(chunks[:60])]
    )
    call = stack.stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S)
    res = Collected()
    for resp in call:  # until the first answer: then change the question
        res.responses.append(resp)
        if resp.WhichOneof("response") == "caption" and resp.caption.question_id:
            break
    change = captions_pb2.SetQuestions(
        questions=[captions_pb2.Question(id="low", text="Is there a low tone?")]
    )
    feeder.put(captions_pb2.StreamCaptionsRequest(set_questions=change))
    time.sleep(1.5)  # LM workers pick up changed questions within half a heartbeat (0.5 s)
    feeder.put(*[audio_req(d, i + 61) for i, d in enumerate(chunks[60:])])
    feeder.close()
    rest = collect(call)
    res.responses += rest.responses
    assert rest.error is None and res.kinds()[-1] == "ended", res.table()
    assert [x.id for x in res.started.effective_config.questions] == ["high"]
    answers = [c for c in res.captions if c.question_id]
    captions = [c for c in res.captions if not c.question_id]
    assert answers[0].question_id == "high" and answers[-1].question_id == "low", res.table()
    assert {a.question_id for a in answers} == {"high", "low"}
    for c in captions:  # every update answers the questions of its time, over the same window
        same = [a for a in answers if (a.segment_id, a.revision) == (c.segment_id, c.revision)]
        assert len(same) == 1 and same[0].window_end_seconds == c.window_end_seconds, res.table()
