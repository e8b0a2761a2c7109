"""The monitoring features of the pages in real browsers (Chromium via Playwright, Firefox ESR via
WebDriver BiDi): a match rule set over the HTTP API fires on the fake microphone's high tone; the live
page shows the alert with a playable clip, and a question added on the page gets answers beside the
caption; the monitoring view's card shows the level and the alert count, and the stream's timeline
shows the alert with its clip."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import time
import urllib.parse
import wave
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.training.synth import types_in_caption
from tests.gateway.bidi import Firefox, Session, write_profile
from tests.gateway.test_browser import ARTIFACTS, CHROMIUM, chromium_args, write_wav
from tests.gateway.test_firefox import FIREFOX, TONE_HZ, go_live, q
from tests.gateway.test_http import http, models, running_stack  # noqa: F401  (models is a fixture)

TONE_RULE = {"kind": "match", "pattern": "high tone", "finals_only": False}  # default 60 s cooldown
QUESTION = "What can be heard?"

pytestmark = pytest.mark.slow


def put_rule(base: str) -> None:
    status, _, raw = http("PUT", f"{base}/api/rules/tone", TONE_RULE)  # an open gateway: no key
    assert status == 200, raw


def check_clip(base: str, sid: str) -> tuple[str, float]:
    """The stream's alert from the API, and its clip: a RIFF/WAVE file holding audio."""
    query = urllib.parse.urlencode({"stream": sid})
    status, _, raw = http("GET", f"{base}/api/alerts?{query}")
    assert status == 200, raw
    alerts = json.loads(raw)["alerts"]
    assert alerts and alerts[0]["rule_id"] == "tone" and alerts[0]["has_clip"], alerts
    alert_id = alerts[0]["alert_id"]
    status, headers, wav = http("GET", f"{base}/api/alerts/{alert_id}/clip.wav")
    assert status == 200 and headers["Content-Type"].startswith("audio/wav"), (status, headers)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE", wav[:16]
    with wave.open(io.BytesIO(wav)) as w:
        seconds = w.getnframes() / w.getframerate()
    assert seconds > 0, "the clip holds no audio"
    return alert_id, seconds


# --- Chromium -------------------------------------------------------------------------------------


def wait_value(locator: Any, expression: str, pred: Any, timeout: float, what: str) -> Any:
    """Polls a JavaScript function of the element (run over the DevTools protocol, so the page's CSP
    does not apply) until ``pred`` holds for its value."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while time.monotonic() < deadline:
        value = locator.evaluate(expression)
        if pred(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last value {value!r})")


CLIP_STATE = (
    "a => ({ready: a.readyState, duration: Number.isFinite(a.duration) ? a.duration : -1, src: a.src})"
)


def playable(v: dict[str, Any]) -> bool:
    return bool(v["ready"] >= 1 and v["duration"] > 0)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_questions_alerts_and_timeline_in_chromium(
    redis_url: str,
    models: tuple[Any, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    wav = tmp_path / "tone_then_noise.wav"
    write_wav(wav, "pink_noise", seed=11)
    profile = tmp_path / "profile"
    args = chromium_args(wav)
    with running_stack(redis_url, models) as stack, sync_api.sync_playwright() as pw:
        put_rule(stack.base)
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=args
        )
        try:
            page = browser.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(f"{stack.base}/")
            page.get_by_label("Window (seconds)").fill("4")
            page.get_by_label("Update every (seconds)").fill("1")
            # One question before the stream (sent with the offer), one while it runs (data channel).
            page.get_by_label("New question").fill(QUESTION)
            page.get_by_test_id("question-add").click()
            rows = page.get_by_test_id("question-row")
            expect(rows).to_have_count(1)
            page.get_by_test_id("start-mic").click()
            expect(page.get_by_test_id("state")).to_have_text("live", timeout=20_000)
            sid = page.get_by_test_id("session-id").inner_text()
            assert sid
            page.get_by_label("New question").fill("Is there a tone?")
            page.get_by_label("New question").press("Enter")
            expect(rows).to_have_count(2)

            for i in range(2):
                expect(rows.nth(i).get_by_test_id("answer-text")).to_have_text(
                    re.compile(r"\w"), timeout=25_000
                )
            answer = rows.first.get_by_test_id("answer-text").inner_text()
            assert types_in_caption(answer), answer  # the demo model answers with a caption
            # The caption display is the caption's own: answers go to their rows only.
            expect(page.get_by_test_id("live-caption")).to_have_text(re.compile("high tone"), timeout=15_000)

            alert = page.get_by_test_id("alerts").get_by_test_id("alert")
            expect(alert.first).to_be_visible(timeout=30_000)
            expect(alert.first.get_by_test_id("alert-rule")).to_have_text("tone")
            expect(alert.first.get_by_test_id("alert-text")).to_have_text(re.compile("high tone"))
            expect(alert.first.get_by_test_id("alert-window")).to_have_text(
                re.compile(r"^\[\d\d:\d\d–\d\d:\d\d\]$")
            )
            alert_id, seconds = check_clip(stack.base, sid)
            assert alert.first.get_attribute("data-alert") == alert_id
            clip = alert.first.get_by_test_id("alert-clip")
            state = wait_value(clip, CLIP_STATE, playable, 15, "the alert's clip loading in the page")
            assert state["src"].endswith(f"/api/alerts/{alert_id}/clip.wav"), state
            assert abs(state["duration"] - seconds) < 0.5, (state, seconds)

            # Removing a question takes its row away (and the change goes to the server).
            rows.nth(1).get_by_test_id("question-remove").click()
            expect(rows).to_have_count(1)

            monitor = browser.new_page()
            monitor.on("console", lambda m: console.append(f"monitor {m.type}: {m.text}"))
            monitor.goto(f"{stack.base}/monitor")
            card = monitor.locator(f'[data-testid="session-card"][data-session="{sid}"]')
            expect(card.get_by_test_id("card-level")).to_contain_text("dBFS", timeout=10_000)
            expect(card.get_by_test_id("card-alerts")).to_have_attribute("data-count", re.compile("^[1-9]"))
            expect(card.get_by_test_id("card-alerts")).to_have_class(re.compile(r"\bhot\b"))
            expect(card.get_by_test_id("card-questions")).to_contain_text(QUESTION)
            opener = card.get_by_test_id("card-open")
            opener.focus()
            monitor.keyboard.press("Enter")  # keyboard-usable: a real button
            timeline = monitor.get_by_test_id("timeline-list")
            entry = timeline.locator('[data-testid="timeline-entry"][data-kind="alert"]')
            expect(entry.first).to_be_visible(timeout=10_000)
            expect(entry.first).to_contain_text("tone")
            # History keeps final captions and answers: they join the open timeline as they come.
            expect(timeline.locator('[data-kind="caption"]').first).to_be_visible(timeout=25_000)
            expect(timeline.locator('[data-kind="answer"]').first).to_be_visible(timeout=10_000)
            walls = [
                float(w) for w in timeline.locator("li").evaluate_all("ls => ls.map(l => l.dataset.wall)")
            ]
            assert walls == sorted(walls), "the timeline is not in time order"
            wait_value(
                entry.first.get_by_test_id("alert-clip"), CLIP_STATE, playable, 15, "the timeline's clip"
            )

            monitor.get_by_label("Search captions, answers and alerts").fill("high tone")
            monitor.get_by_test_id("history-search-button").click()
            expect(monitor.get_by_test_id("timeline-status")).to_contain_text("results for", timeout=10_000)
            expect(timeline.get_by_test_id("timeline-entry").first).to_contain_text("high tone")
            ARTIFACTS.mkdir(exist_ok=True)
            monitor.screenshot(path=str(ARTIFACTS / "browser-monitor.png"), full_page=True)
            monitor.close()

            page.screenshot(path=str(ARTIFACTS / "browser-monitoring.png"), full_page=True)
            page.get_by_test_id("stop").click()
            expect(page.get_by_test_id("state")).to_have_text(re.compile("^(ended|idle)$"), timeout=15_000)
            history = page.get_by_test_id("history").locator("li")
            segments = history.evaluate_all("ls => ls.map(l => l.dataset.segment)")
            assert len(segments) == len(set(segments)), segments  # one row per caption segment
            assert not [c for c in console if c.startswith(("error", "monitor error"))], console
        finally:
            browser.close()
            shutil.rmtree(profile, ignore_errors=True)


# --- Firefox --------------------------------------------------------------------------------------


CLIP_JS = (
    "(() => {{ const a = document.querySelector({sel}); "
    "return a && a.readyState >= 1 && Number.isFinite(a.duration) && a.duration > 0 ? a.duration : 0; }})()"
)


async def drive_firefox(bidi_url: str, base: str) -> tuple[str, float]:
    async with aiohttp.ClientSession() as client, client.ws_connect(bidi_url, max_msg_size=64 << 20) as ws:
        s = Session(ws)
        await s.cmd("session.new", {"capabilities": {}})
        await s.cmd("session.subscribe", {"events": ["log.entryAdded"]})
        ctx = (await s.cmd("browsingContext.getTree"))["contexts"][0]["context"]
        sid = await go_live(s, ctx, base)
        # A question added while the stream runs goes over the data channel.
        await s.eval(
            ctx,
            f"{q('question-text')}.value = {json.dumps(QUESTION)}; {q('question-add')}.click()",
            user_activation=True,
        )
        answer = await s.wait_for(
            ctx,
            "(() => { const a = document.querySelector('[data-testid=question-row] [data-testid=answer-text]');"
            " return a ? a.textContent.trim() : ''; })()",
            25,
            "an answer to the question",
        )
        alert_id = await s.wait_for(
            ctx,
            "(() => { const a = document.querySelector('[data-testid=alerts] [data-testid=alert]');"
            " return a ? a.dataset.alert : ''; })()",
            30,
            "an alert in the alerts list",
        )
        rule = await s.eval(
            ctx, "document.querySelector('[data-testid=alert] [data-testid=alert-rule]').textContent"
        )
        assert rule == "tone"
        found_id, seconds = check_clip(base, sid)
        assert found_id == alert_id
        duration = await s.wait_for(
            ctx, CLIP_JS.format(sel="'[data-testid=alert] [data-testid=alert-clip]'"), 15, "the clip loading"
        )
        assert abs(duration - seconds) < 0.5, (duration, seconds)

        monitor = await s.new_tab()
        await s.navigate(monitor, f"{base}/monitor")
        card = f"[data-session='{sid}']"
        count = await s.wait_for(
            monitor,
            f'(() => {{ const c = document.querySelector("{card} [data-testid=card-alerts]");'
            " return c ? Number(c.dataset.count) : 0; })()",
            15,
            "the card's alert count",
        )
        assert count >= 1
        level = await s.wait_for(
            monitor,
            f'(() => {{ const c = document.querySelector("{card} [data-testid=card-level]");'
            " return c && / dBFS$/.test(c.textContent) ? c.textContent : ''; })()",
            10,
            "the card's audio level",
        )
        assert "dBFS" in level, level
        await s.eval(monitor, f'document.querySelector("{card} [data-testid=card-open]").click()', True)
        await s.wait_for(
            monitor,
            "document.querySelector('[data-testid=timeline-entry][data-kind=alert]') !== null",
            10,
            "the alert in the timeline",
        )
        await s.wait_for(
            monitor,
            CLIP_JS.format(sel="'[data-kind=alert] [data-testid=alert-clip]'"),
            15,
            "the timeline's clip loading",
        )
        await s.cmd("browsingContext.close", {"context": monitor})

        ARTIFACTS.mkdir(exist_ok=True)
        await s.screenshot(ctx, ARTIFACTS / "firefox-monitoring.png")
        await s.eval(ctx, f"{q('stop')}.click()", user_activation=True)
        await s.wait_for(
            ctx, f"['ended', 'idle'].includes({q('state')}.textContent)", 15, "the session ending"
        )
        errors = s.console("error")
        assert not errors, errors
        await s.cmd("session.end")
        return str(answer), float(duration)


@pytest.mark.skipif(FIREFOX is None, reason="Firefox is not installed (Debian package firefox-esr)")
def test_questions_alerts_and_timeline_in_firefox(
    redis_url: str,
    models: tuple[Any, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    assert FIREFOX is not None
    profile = tmp_path / "firefox-profile"
    write_profile(profile, {"media.navigator.audio.fake_frequency": TONE_HZ})
    with running_stack(redis_url, models) as stack:
        put_rule(stack.base)
        ff = Firefox(FIREFOX, profile)
        try:
            answer, duration = asyncio.run(drive_firefox(ff.url, stack.base))
        except BaseException:
            print("Firefox's last output:\n" + "\n".join(ff.log[-40:]))
            raise
        finally:
            ff.close()
    assert answer
    print(f"answer: {answer!r}; clip: {duration:.2f} s")
