"""The monitoring API over HTTP against the in-process stack (real Redis): rules CRUD and
validation, tenants kept apart, scopes, alerts with their clips, history search and WebVTT, a live
session's questions changed over HTTP and over the WebRTC data channel, and the data channel's
per-question interim coalescing."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
import urllib.parse
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from encoder_service.server import start_encoder_server
from lm_service.server import start_lm_server
from services.audio.subtitles import parse_webvtt
from services.gateway.server import GatewayServer, start_gateway
from services.gateway.webrtc import Peer, WebRtcLimits
from services.monitor.limits import MonitorLimits
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc
from services.security import ApiKeys, Authenticator, ServerSecurity, add_key
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
from tests.gateway.test_http import Client, FakeChannel, SoundTrack, http, running_stack, sounds

SR = 16000
TONE_RULE = {"kind": "match", "pattern": "high tone", "cooldown_seconds": 0}


@pytest.fixture(scope="module")
def models(encoder_model: Any, engine: Any) -> tuple[Any, Any]:
    return encoder_model, engine


@dataclass
class KeyedStack:
    """encoder + LM + gateway (gRPC and HTTP) whose gateway takes API keys of a few tenants."""

    gateway: GatewayServer
    base: str
    stub: captions_pb2_grpc.CaptionServiceStub
    key: dict[str, str] = field(default_factory=dict)  # name -> API key

    def h(self, who: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key[who]}"} if who else {}

    def get(self, path: str, who: str | None = "alice", **query: Any) -> tuple[int, dict[str, str], bytes]:
        url = self.base + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        return http("GET", url, headers=self.h(who))

    def json(
        self, method: str, path: str, who: str | None = "alice", body: object = None, **query: Any
    ) -> Any:
        url = self.base + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        status, _, raw = http(method, url, body, self.h(who))
        assert status == 200, (status, raw)
        return json.loads(raw)

    def metadata(self, who: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.key[who]}")]


@contextlib.contextmanager
def keyed_stack(
    redis_url: str, models: tuple[Any, Any], tmp_path: Path, **gateway_kw: Any
) -> Iterator[KeyedStack]:
    """Tenants alice and bob (stream, caption, monitor), carol (caption only), ops (admin)."""
    path = tmp_path / "api-keys.json"
    key = {
        "alice": add_key(path, "alice", ["stream", "caption", "monitor"])[0],
        "bob": add_key(path, "bob", ["stream", "caption", "monitor"])[0],
        "carol": add_key(path, "carol", ["caption"])[0],
        "ops": add_key(path, "ops", ["admin"])[0],
    }
    model, engine = models
    enc = start_encoder_server(model, redis_url)
    lm = start_lm_server(engine, redis_url)
    gw = start_gateway(
        redis_url,
        f"127.0.0.1:{enc.port}",
        f"127.0.0.1:{lm.port}",
        http_address="127.0.0.1:0",
        security=ServerSecurity(auth=Authenticator(api_keys=ApiKeys(path))),
        **gateway_kw,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
    try:
        yield KeyedStack(
            gw, f"http://127.0.0.1:{gw.http_port}", captions_pb2_grpc.CaptionServiceStub(channel), key
        )
    finally:
        channel.close()
        gw.stop(grace=1.0)
        lm.stop(grace=1.0)
        enc.stop(grace=1.0)


def error_of(resp: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = resp
    assert headers["Content-Type"].startswith("application/json"), body
    return status, json.loads(body)["error"]


def stream_as(stack: KeyedStack, who: str, parts: list[tuple[str, float]], seed: int = 0) -> Collected:
    """One whole gRPC stream of ``parts`` (4 s windows, 1 s hops) as ``who``; its responses."""
    audio = clip(parts, seed=seed)
    reqs = [config(window_seconds=4.0, hop_seconds=1.0)] + [
        audio_req(d, i + 1) for i, d in enumerate(pcm_chunks(audio))
    ]
    res = collect(
        stack.stub.StreamCaptions(iter(reqs), timeout=STREAM_TIMEOUT_S, metadata=stack.metadata(who))
    )
    assert res.error is None and res.kinds()[-1] == "ended", res.table()
    return res


def wait_until(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


# --- rules, secrets, scopes, tenants --------------------------------------------------------------


def test_rules_crud_validation_scopes_and_tenants(
    redis_url: str, models: tuple[Any, Any], tmp_path: Path
) -> None:
    with keyed_stack(redis_url, models, tmp_path, monitor_limits=MonitorLimits(max_rules=2)) as s:
        for path in ("/api/rules", "/api/alerts", "/api/history", "/api/webhook-secret"):
            status, msg = error_of(s.get(path, who=None))
            assert status == 401 and "Bearer" in msg, path
            status, _, _ = http("GET", s.base + path, headers={"Authorization": "Bearer wrong"})
            assert status == 401
            status, msg = error_of(s.get(path, who="carol"))  # a key without the monitor scope
            assert status == 403 and "monitor" in msg, path
        status, msg = error_of(http("PUT", f"{s.base}/api/rules/x", TONE_RULE, s.h("carol")))
        assert status == 403

        # Create, read, list, replace, delete.
        got = s.json("PUT", "/api/rules/tone", body=TONE_RULE)
        assert got["rule"]["rule_id"] == "tone" and got["rule"]["cooldown_seconds"] == 0.0
        assert got["rule"]["debounce_seconds"] == 0.0 and got["rule"]["enabled"] is True  # defaults
        first = got["version"]
        assert s.json("GET", "/api/rules/tone")["rule"] == got["rule"]
        changed = s.json("PUT", "/api/rules/tone", body=TONE_RULE | {"finals_only": True, "rule_id": "tone"})
        assert changed["version"] > first and changed["rule"]["finals_only"] is True
        assert [r["rule_id"] for r in s.json("GET", "/api/rules")["rules"]] == ["tone"]

        # Validation: 400 with a message naming what is wrong.
        bad = [
            ({"kind": "nope"}, "kind"),
            (TONE_RULE | {"colour": "red"}, "colour"),
            (TONE_RULE | {"rule_id": "other"}, "rule_id"),
            ({"kind": "answer_true"}, "question id"),
            (TONE_RULE | {"webhook_url": "ftp://x"}, "webhook_url"),
            (TONE_RULE | {"regex": True, "pattern": "("}, "regular expression"),
            ([1, 2], "JSON object"),
        ]
        for body, word in bad:
            status, msg = error_of(http("PUT", f"{s.base}/api/rules/tone", body, s.h("alice")))
            assert status == 400 and word in msg, (body, msg)
        status, msg = error_of(http("PUT", f"{s.base}/api/rules/bad%20id", TONE_RULE, s.h("alice")))
        assert status == 400 and "rule_id" in msg
        status, msg = error_of(http("PUT", f"{s.base}/api/rules/tone", raw=b"{nope", headers=s.h("alice")))
        assert status == 400 and "JSON" in msg
        text_plain = s.h("alice") | {"Content-Type": "text/plain"}
        status, msg = error_of(http("PUT", f"{s.base}/api/rules/tone", raw=b"{}", headers=text_plain))
        assert status == 415 and "application/json" in msg
        assert s.json("GET", "/api/rules/tone")["rule"] == changed["rule"]  # untouched by the bad ones

        # Tenants are apart: bob sees none of alice's rules and cannot delete them; the admin's
        # key is scoped to its own tenant too.
        assert s.json("GET", "/api/rules", who="bob")["rules"] == []
        assert s.json("GET", "/api/rules", who="ops")["rules"] == []
        assert error_of(s.get("/api/rules/tone", who="bob"))[0] == 404
        assert http("DELETE", f"{s.base}/api/rules/tone", headers=s.h("bob"))[0] == 404
        assert http("DELETE", f"{s.base}/api/rules/tone", headers=s.h("carol"))[0] == 403
        assert [r["rule_id"] for r in s.json("GET", "/api/rules")["rules"]] == ["tone"]

        # At most max_rules per tenant: 429 with a message.
        s.json("PUT", "/api/rules/quiet", body={"kind": "silence"})
        status, msg = error_of(http("PUT", f"{s.base}/api/rules/third", TONE_RULE, s.h("alice")))
        assert status == 429 and "2 rules" in msg
        s.json("PUT", "/api/rules/third", who="bob", body=TONE_RULE)  # bob's own count

        status, _, body = http("DELETE", f"{s.base}/api/rules/tone", headers=s.h("alice"))
        assert status == 204 and body == b""
        assert error_of(http("DELETE", f"{s.base}/api/rules/tone", headers=s.h("alice")))[0] == 404
        assert [r["rule_id"] for r in s.json("GET", "/api/rules")["rules"]] == ["quiet"]

        # Each tenant's webhook secret: made once, then the same.
        a1 = s.json("GET", "/api/webhook-secret")["secret"]
        assert len(a1) >= 16 and s.json("GET", "/api/webhook-secret")["secret"] == a1
        assert s.json("GET", "/api/webhook-secret", who="bob")["secret"] != a1

        # Bad query parameters.
        for path, query, word in (
            ("/api/alerts", {"limit": "0"}, "limit"),
            ("/api/alerts", {"limit": "many"}, "limit"),
            ("/api/history", {"since": "yesterday"}, "since"),
            ("/api/history", {"since": "20", "until": "10"}, "after"),
            ("/api/history", {"kind": "bark"}, "kind"),
            ("/api/history", {"format": "vtt"}, "stream"),
            ("/api/history", {"format": "srt"}, "format"),
            ("/api/history", {"before": "nope"}, "cursor"),
        ):
            status, msg = error_of(s.get(path, **query))
            assert status == 400 and word in msg, (path, query, msg)
        assert error_of(s.get("/api/alerts/1718000000123-9f2c4a1b7e/clip.wav"))[0] == 404


# --- alerts, clips, history ----------------------------------------------------------------------


def test_alerts_clips_and_history_are_the_tenants_own(
    redis_url: str, models: tuple[Any, Any], tmp_path: Path
) -> None:
    with keyed_stack(redis_url, models, tmp_path) as s:
        s.json("PUT", "/api/rules/tone", body=TONE_RULE)
        parts = [("white_noise", 4.0), ("high_tone", 8.0)]
        sid1 = stream_as(s, "alice", parts, seed=1).started.session_id
        wait_until(lambda: s.json("GET", "/api/alerts", stream=sid1)["alerts"], 20, "alert of stream 1")
        time.sleep(0.05)
        between = time.time()
        time.sleep(0.05)
        sid2 = stream_as(s, "alice", parts, seed=2).started.session_id
        stream_as(s, "bob", parts, seed=3)  # bob has no rule: no alerts, but history of his own

        alerts = wait_until(
            lambda: (
                [a for a in s.json("GET", "/api/alerts")["alerts"] if a["stream"] == sid2]
                and s.json("GET", "/api/alerts")["alerts"]
            ),
            20,
            "alert of stream 2",
        )
        assert {a["stream"] for a in alerts} == {sid1, sid2}
        assert [a["alert_id"] for a in alerts] == sorted((a["alert_id"] for a in alerts), reverse=True)
        for a in alerts:
            assert a["rule_id"] == "tone" and "high tone" in a["text"].lower() and a["tenant"] == "alice"
            assert a["has_clip"] is True
        assert [a["stream"] for a in s.json("GET", "/api/alerts", stream=sid2)["alerts"]] == [sid2] * len(
            [a for a in alerts if a["stream"] == sid2]
        )
        assert len(s.json("GET", "/api/alerts", limit=1)["alerts"]) == 1

        # The clip: a WAV of the window that fired.
        a = alerts[0]
        status, headers, wav = s.get(f"/api/alerts/{a['alert_id']}/clip.wav")
        assert status == 200 and headers["Content-Type"] == "audio/wav"
        with wave.open(io.BytesIO(wav)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2)
            frames = w.getnframes()
        assert frames == round(a["window_end"] * SR) - round(a["window_start"] * SR) > 0

        # History: the finals naming the tone, across both streams, newest first.
        found = s.json("GET", "/api/history", q="high tone", kind="caption")["entries"]
        assert {e["stream"] for e in found} == {sid1, sid2}
        assert all("high tone" in e["text"].lower() and e["kind"] == "caption" for e in found)
        assert [e["wall_time"] for e in found] == sorted((e["wall_time"] for e in found), reverse=True)
        assert {
            e["stream"] for e in s.json("GET", "/api/history", q="high tone", since=between)["entries"]
        } == {sid2}
        assert {
            e["stream"] for e in s.json("GET", "/api/history", q="high tone", until=between)["entries"]
        } == {sid1}
        in_alerts = s.json("GET", "/api/history", kind="alert")["entries"]
        assert {e["event_id"] for e in in_alerts} == {a["alert_id"] for a in alerts}

        # Pages: a cursor goes on where the last page stopped.
        one = s.json("GET", "/api/history", q="high tone", limit=1)
        assert len(one["entries"]) == 1 and one["before"]
        two = s.json("GET", "/api/history", q="high tone", limit=1, before=one["before"])
        assert two["entries"] and two["entries"][0] != one["entries"][0]
        assert s.json("GET", "/api/history", q="high tone", limit=1000)["before"] is None

        # WebVTT of one stream.
        status, headers, body = s.get("/api/history", stream=sid1, format="vtt")
        assert status == 200 and headers["Content-Type"].startswith("text/vtt")
        cues = parse_webvtt(body.decode())
        entries = s.json("GET", "/api/history", stream=sid1, limit=1000)["entries"]
        assert len(cues) == len(entries) > 0
        assert any(c.text.startswith("ALERT tone:") for c in cues)
        assert any("high tone" in c.text.lower() and not c.text.startswith("ALERT") for c in cues)

        # Bob sees none of it.
        assert s.json("GET", "/api/alerts", who="bob")["alerts"] == []
        assert error_of(s.get(f"/api/alerts/{a['alert_id']}/clip.wav", who="bob"))[0] == 404
        bobs = s.json("GET", "/api/history", who="bob", q="high tone")["entries"]
        assert bobs and {e["stream"] for e in bobs}.isdisjoint({sid1, sid2})
        assert s.json("GET", "/api/history", who="bob", stream=sid1)["entries"] == []
        assert parse_webvtt(s.get("/api/history", who="bob", stream=sid1, format="vtt")[2].decode()) == []
        assert s.json("GET", "/api/history", who="ops", q="high tone")["entries"] == []


# --- a live session's questions ------------------------------------------------------------------


def test_questions_change_over_http_and_the_session_list_shows_level_questions_alerts(
    redis_url: str, models: tuple[Any, Any], tmp_path: Path
) -> None:
    with keyed_stack(redis_url, models, tmp_path) as s:
        s.json("PUT", "/api/rules/tone", body=TONE_RULE)
        chunks = pcm_chunks(clip([("high_tone", 16.0)], seed=4))
        q1 = captions_pb2.Question(id="high", text="Is there a high tone?")
        feeder = Feeder()
        feeder.put(
            config(window_seconds=4.0, hop_seconds=1.0, questions=[q1]),
            *[audio_req(d, i + 1) for i, d in enumerate(chunks[:20])],
        )

        def pace() -> None:  # the rest in real time, so the session is live (with a level) meanwhile
            for i, d in enumerate(chunks[20:], start=21):
                feeder.put(audio_req(d, i))
                time.sleep(len(d) / 2 / SR)
            feeder.close()

        res = Collected()
        call = s.stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S, metadata=s.metadata("alice"))

        def read() -> None:  # as they come
            with contextlib.suppress(grpc.RpcError):
                for resp in call:
                    res.responses.append(resp)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        threading.Thread(target=pace, daemon=True).start()

        def answers(qid: str) -> list[captions_pb2.CaptionEvent]:
            return [c for c in list(res.captions) if c.question_id == qid]

        wait_until(lambda: answers("high"), 40, "answer to the first question")
        sid, secret = res.started.session_id, res.started.resume_secret
        url = f"{s.base}/api/sessions/{sid}/questions"
        new = {"questions": [{"id": "low", "text": "Is there a low tone?"}]}

        # Not bob's session, not carol's; an unknown session; a bad body.
        status, msg = error_of(http("PUT", url, new, s.h("bob")))
        assert status == 403 and "secret" in msg
        assert error_of(http("PUT", url, new, s.h("carol")))[0] == 403
        assert error_of(http("PUT", url, new, s.h("bob") | {"X-Resume-Secret": "wrong"}))[0] == 403
        assert error_of(http("PUT", f"{s.base}/api/sessions/nope/questions", new, s.h("alice")))[0] == 404
        status, msg = error_of(http("PUT", url, {"questions": [{"id": "bad id", "text": "?"}]}, s.h("alice")))
        assert status == 400 and "question ids" in msg
        assert error_of(http("PUT", url, {"questions": []} | {"x": 1}, s.h("alice")))[0] == 400
        assert error_of(http("PUT", url, new))[0] == 401

        # The session list: its questions, a live audio level, its open alerts.
        def card() -> dict[str, Any] | None:
            listing = s.json("GET", "/api/sessions")
            mine = [c for c in listing["sessions"] if c["id"] == sid]
            return mine[0] if mine and mine[0]["level_dbfs"] is not None and mine[0]["open_alerts"] else None

        c = wait_until(card, 30, "session card with a level and an alert")
        assert c["questions"] == [{"id": "high", "text": "Is there a high tone?"}]
        assert -120.0 <= c["level_dbfs"] <= 0.0 and c["open_alerts"] >= 1
        # The card's caption is the caption, never an answer (each update writes both).
        assert c["latest"] is not None and c["latest"]["question_id"] == ""
        assert c["latest_final"] is None or c["latest_final"]["question_id"] == ""
        assert [x for x in s.json("GET", "/api/sessions", who="bob")["sessions"] if x["id"] == sid] == []

        # A stranger holding the secret may change them; answers to the new question follow.
        status, _, raw = http("PUT", url, new, s.h("bob") | {"X-Resume-Secret": secret})
        assert status == 200, raw
        got = json.loads(raw)
        assert got["questions"] == new["questions"]
        cards = [x for x in s.json("GET", "/api/sessions")["sessions"] if x["id"] == sid]
        assert not cards or cards[0]["questions"] == new["questions"]
        reader.join(STREAM_TIMEOUT_S)
        assert res.kinds()[-1] == "ended", res.table()
        assert answers("low"), res.table()
        last_high = max(c.window_end_seconds for c in answers("high"))
        assert min(c.window_end_seconds for c in answers("low")) >= last_high - 1.0  # the change took over


# --- the data channel ----------------------------------------------------------------------------


def test_data_channel_questions_answers_and_alerts(redis_url: str, models: tuple[Any, Any]) -> None:
    with running_stack(redis_url, models) as s:
        status, _, raw = http("PUT", f"{s.base}/api/rules/tone", TONE_RULE)  # an open gateway
        assert status == 200, raw

        async def scenario() -> list[dict[str, Any]]:
            client = Client(s.base, SoundTrack(sounds(("high_tone", 14.0))))
            await client.connect(
                {
                    "window_seconds": 4,
                    "hop_seconds": 1,
                    "questions": [{"id": "high", "text": "Is there a high tone?"}],
                }
            )
            started = await client.wait_for(lambda m: m["type"] == "started", 10, "started message")
            assert started["config"]["questions"] == [{"id": "high", "text": "Is there a high tone?"}]
            await client.wait_for(
                lambda m: m.get("question_id") == "high", 20, "answer to the first question"
            )
            alert = await client.wait_for(lambda m: m["type"] == "alert", 20, "alert message")
            assert alert["rule_id"] == "tone" and alert["alert_id"] and "is_final" not in alert

            client.channel.send(
                json.dumps({"type": "questions", "questions": [{"id": "bad id", "text": "x"}]})
            )
            err = await client.wait_for(lambda m: m["type"] == "error", 10, "error for a bad question")
            assert err["reason"] == "questions" and not err["fatal"] and "question ids" in err["message"]
            low = [{"id": "low", "text": "Is there a low tone?"}]
            client.channel.send(json.dumps({"type": "questions", "questions": low}))
            ack = await client.wait_for(lambda m: m["type"] == "questions", 10, "questions answer")
            assert ack["questions"] == low
            await client.wait_for(lambda m: m.get("question_id") == "low", 20, "answer to the new question")
            client.channel.send(json.dumps({"type": "stop"}))
            await client.wait_for(lambda m: m["type"] == "ended", 20, "ended message")
            await client.pc.close()
            return client.messages

        messages = asyncio.run(scenario())
        ids = [m.get("question_id") for m in messages if m["type"] == "caption"]
        first_low = ids.index("low")
        assert "high" not in ids[first_low:]  # once changed, only the new question is answered


def test_backed_up_channel_coalesces_interims_per_question() -> None:
    async def scenario() -> list[dict[str, Any]]:
        peer = Peer(SimpleNamespace(limits=WebRtcLimits(high_water_bytes=1000)), None)  # type: ignore[arg-type]
        ch = FakeChannel()
        peer.channel = ch  # type: ignore[assignment]

        def cap(seg: int, rev: int, final: bool, qid: str = "") -> dict[str, Any]:
            text = f"{qid or 'c'}{seg}.{rev}"
            return {
                "type": "caption",
                "segment_id": seg,
                "revision": rev,
                "is_final": final,
                "text": text,
                "question_id": qid,
            }

        ch.bufferedAmount = 5000  # backed up
        peer.deliver(cap(0, 1, False))
        peer.deliver(cap(0, 1, False, "a"))
        peer.deliver(cap(0, 1, False, "b"))
        peer.deliver(cap(0, 2, False))  # replaces only the caption's held interim
        peer.deliver(cap(0, 2, False, "a"))  # replaces only a's
        peer.deliver({"type": "alert", "alert_id": "x", "text": "alert"})  # alerts are never held
        peer.deliver(cap(0, 2, True, "b"))  # b's final supersedes b's interim, not the others
        peer.flush_pending()  # still backed up: nothing
        ch.bufferedAmount = 0
        peer.flush_pending()
        peer.flush_pending()  # nothing is sent twice
        return ch.sent

    sent = asyncio.run(scenario())
    assert [m["text"] for m in sent] == ["alert", "b0.2", "c0.2", "a0.2"]
