"""``midasheng rules|search|alerts|clip|questions`` against a running stack whose gateway takes API
keys: the commands in-process (``services.cli.main``), their output, and their errors (a bad URL,
no key, someone else's session)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import time
import wave
from pathlib import Path
from typing import Any

import pytest

from services.audio.subtitles import parse_webvtt
from services.cli import main
from services.cli.monitor import parse_question, parse_time
from services.security import API_KEY_ENV
from tests.gateway.test_monitor_api import keyed_stack, stream_as, wait_until


@pytest.fixture(scope="module")
def models(encoder_model: Any, engine: Any) -> tuple[Any, Any]:
    return encoder_model, engine


def test_time_and_question_arguments() -> None:
    assert parse_time("1718000000") == 1718000000.0
    assert parse_time("2024-06-10T06:13:20Z") == 1718000000.0
    assert parse_time("2024-06-10T08:13:20+02:00") == 1718000000.0
    assert parse_time(dt.datetime.fromtimestamp(1718000000.5).isoformat()) == 1718000000.5  # local
    for bad in ("yesterday", "2024-13-01", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_time(bad)
    assert parse_question("dog=Is a dog barking?") == {"id": "dog", "text": "Is a dog barking?"}
    for bad in ("dog", "=text", "dog="):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_question(bad)


def test_monitoring_commands_against_a_running_gateway(
    redis_url: str,
    models: tuple[Any, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    with keyed_stack(redis_url, models, tmp_path) as s:
        alice, bob = tmp_path / "alice.key", tmp_path / "bob.key"
        alice.write_text(s.key["alice"] + "\n")
        bob.write_text(s.key["bob"] + "\n")
        base = ["--url", s.base, "--api-key-file", str(alice)]

        # Errors: no key, a wrong one, a gateway that is not there, a URL that is not one.
        code, _, err = run("rules", "list", "--url", s.base)
        assert code == 1 and "HTTP 401" in err and "--api-key-file" in err
        monkeypatch.setenv(API_KEY_ENV, "mdk_wrong")
        code, _, err = run("alerts", "--url", s.base)
        assert code == 1 and "HTTP 401" in err and "not accepted" in err
        monkeypatch.delenv(API_KEY_ENV)
        code, _, err = run("rules", "list", "--url", "http://127.0.0.1:1", "--timeout", "5")
        assert code == 3 and "cannot reach the gateway at http://127.0.0.1:1" in err
        code, _, err = run("search", "x", "--url", "127.0.0.1:8080")
        assert code == 2 and "--url" in err
        code, _, err = run("rules", "list", "--url", s.base, "--api-key-file", str(tmp_path / "missing"))
        assert code == 2 and "missing" in err

        # rules put / list / delete.
        code, out, err = run(
            "rules", "put", "tone", "--kind", "match", "--pattern", "high tone", "--cooldown", "0", *base
        )
        assert code == 0, err
        assert json.loads(out)["pattern"] == "high tone" and "saved" in err
        code, _, err = run("rules", "put", "bad", "--kind", "answer_true", *base)
        assert code == 1 and "HTTP 400" in err and "question id" in err
        monkeypatch.setenv(API_KEY_ENV, s.key["alice"])  # the key from the environment
        code, _, err = run(
            "rules", "put", "quiet", "--kind", "silence", "--silence-seconds", "30", "--streams", "a-*,b",
            "--streams", "c", "--disabled", "--url", s.base,
        )  # fmt: skip
        assert code == 0, err
        monkeypatch.delenv(API_KEY_ENV)
        code, out, _ = run("rules", "list", *base)
        assert code == 0 and out.splitlines()[0].split()[:2] == ["RULE", "KIND"]
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["quiet", "tone"]
        code, out, _ = run("rules", "list", "--format", "json", *base)
        quiet = {r["rule_id"]: r for r in json.loads(out)}["quiet"]
        assert quiet["streams"] == ["a-*", "b", "c"] and quiet["enabled"] is False
        assert quiet["silence_seconds"] == 30.0
        code, out, _ = run("rules", "list", "--format", "json", "--url", s.base, "--api-key-file", str(bob))
        assert code == 0 and json.loads(out) == []
        code, _, err = run("rules", "delete", "quiet", *base)
        assert code == 0 and "deleted" in err
        code, _, err = run("rules", "delete", "quiet", *base)
        assert code == 1 and "HTTP 404" in err
        code, out, _ = run("rules", "secret", *base)
        assert code == 0 and len(out.strip()) >= 16

        # Alerts, clips and the history of two streams.
        sid1 = stream_as(s, "alice", [("white_noise", 4.0), ("high_tone", 6.0)], seed=1).started.session_id
        wait_until(lambda: s.json("GET", "/api/alerts")["alerts"], 20, "first alert")
        between = time.time()
        time.sleep(0.05)
        res2 = stream_as(s, "alice", [("white_noise", 4.0), ("high_tone", 6.0)], seed=2)
        sid2 = res2.started.session_id
        wait_until(lambda: s.json("GET", "/api/alerts", stream=sid2)["alerts"], 20, "second alert")

        code, out, _ = run("alerts", "--format", "json", *base)
        alerts = json.loads(out)
        assert code == 0 and {a["stream"] for a in alerts} == {sid1, sid2}
        code, out, _ = run("alerts", "--stream", sid1, *base)
        assert code == 0 and alerts[-1]["alert_id"] in out and sid2 not in out
        code, _, err = run("alerts", "--url", s.base, "--api-key-file", str(bob))
        assert code == 0 and "no alerts" in err

        target = tmp_path / "clip.wav"
        a = alerts[0]
        code, _, err = run("clip", a["alert_id"], "-o", str(target), *base)
        assert code == 0 and "wrote" in err
        with wave.open(io.BytesIO(target.read_bytes())) as w:
            assert w.getframerate() == 16000
            assert w.getnframes() == round(a["window_end"] * 16000) - round(a["window_start"] * 16000)
        code, _, err = run(
            "clip", a["alert_id"], "-o", str(target), "--url", s.base, "--api-key-file", str(bob)
        )
        assert code == 1 and "HTTP 404" in err

        code, out, _ = run("search", "high tone", "--kind", "caption", "--format", "json", *base)
        entries = json.loads(out)["entries"]
        assert code == 0 and {e["stream"] for e in entries} == {sid1, sid2}
        iso = dt.datetime.fromtimestamp(between).isoformat()
        code, out, _ = run("search", "high tone", "--since", iso, "--format", "json", *base)
        assert {e["stream"] for e in json.loads(out)["entries"]} == {sid2}
        code, out, _ = run("search", "high tone", "--until", f"{between:.3f}", "--format", "json", *base)
        assert {e["stream"] for e in json.loads(out)["entries"]} == {sid1}
        code, out, err = run("search", "high tone", "--limit", "2", *base)
        assert (
            code == 0 and out.splitlines()[0].split()[:2] == ["TIME", "STREAM"] and len(out.splitlines()) == 3
        )
        assert "--before" in err
        code, out, _ = run("search", "--stream", sid1, "--format", "vtt", *base)
        cues = parse_webvtt(out)
        assert code == 0 and any("high tone" in c.text.lower() for c in cues)
        code, _, err = run("search", "--format", "vtt", *base)
        assert code == 2 and "--stream" in err
        code, out, err = run("search", "high tone", "--url", s.base, "--api-key-file", str(bob))
        assert code == 0 and out == "" and "nothing found" in err

        # questions: the owner, a stranger (refused), a stranger with the secret.
        code, out, err = run("questions", sid2, "low=Is there a low tone?", *base)
        assert code == 0 and out.strip() == "low=Is there a low tone?", err
        code, _, err = run(
            "questions", sid2, "low=Is there a low tone?", "--url", s.base, "--api-key-file", str(bob)
        )
        assert code == 1 and "HTTP 403" in err
        secret = tmp_path / "secret"
        secret.write_text(res2.started.resume_secret)
        code, _, err = run(
            "questions",
            sid2,
            "--clear",
            "--secret-file",
            str(secret),
            "--url",
            s.base,
            "--api-key-file",
            str(bob),
        )
        assert code == 0 and "no questions" in err
        code, _, err = run("questions", sid2, *base)
        assert code == 2 and "--clear" in err


def test_help_texts() -> None:
    for command in (["rules", "put"], ["search"], ["alerts"], ["clip"], ["questions"]):
        out = io.StringIO()
        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(out):
            main([*command, "--help"])
        assert e.value.code == 0 and "--url" in out.getvalue() and "--api-key-file" in out.getvalue()
