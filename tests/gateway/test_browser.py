"""The page in a real browser: headless Debian Chromium plays a WAV as its microphone; the live caption
must name the tone, then follow the change to noise; the monitoring view must show the session."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from services.training.synth import render_sound, types_in_caption
from tests.gateway.test_http import models, running_stack  # noqa: F401  (models is a fixture)

CHROMIUM = "/usr/bin/chromium"
RATE = 48000  # Hz, the WAV Chromium plays as the microphone
PART_SECONDS = 12.0  # s of tone, then s of noise (Chromium loops the file)
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = pytest.mark.slow


def write_wav(path: Path, then: str = "white_noise", seed: int = 7) -> None:
    """PART_SECONDS of a high tone, then of ``then`` (Chromium loops the file)."""
    rng = np.random.default_rng(seed)
    n = int(PART_SECONDS * RATE)
    audio = np.concatenate([render_sound("high_tone", rng, n, sr=RATE), render_sound(then, rng, n, sr=RATE)])
    sf.write(path, audio, RATE, subtype="PCM_16")


def chromium_args(wav: Path) -> list[str]:
    """Headless Chromium, no network chatter, ``wav`` as the microphone (allowed without asking)."""
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    ]


def wait_caption(page: Any, pred: Callable[[list[str]], bool], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        text = page.get_by_test_id("live-caption").inner_text()
        if not seen or seen[-1] != text:
            seen.append(text)
        if pred(types_in_caption(text)):
            return text
        time.sleep(0.2)
    raise AssertionError(
        f"the live caption did not name {what} within {timeout:.0f} s; it showed {seen[-10:]}"
    )


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_microphone_to_live_captions_in_chromium(
    redis_url: str,
    models: tuple[Any, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    wav = tmp_path / "tone_then_noise.wav"
    write_wav(wav)
    ARTIFACTS.mkdir(exist_ok=True)
    profile = tmp_path / "profile"
    args = chromium_args(wav)
    with running_stack(redis_url, models) as stack, sync_api.sync_playwright() as pw:
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
            start = page.get_by_test_id("start-mic")
            start.focus()
            page.keyboard.press("Enter")  # keyboard-usable: a real button
            # Locator assertions, never string predicates: the page's CSP (script-src 'self') forbids
            # the eval that a string given to wait_for_function needs.
            expect(page.get_by_test_id("state")).to_have_text("live", timeout=20_000)
            sid = page.get_by_test_id("session-id").inner_text()
            assert sid

            tone = wait_caption(page, lambda t: "high_tone" in t, 25, "the high tone")
            expect(page.locator("#level")).to_have_attribute("data-engine", re.compile(".+"), timeout=10_000)
            engine = page.evaluate("document.getElementById('level').dataset.engine")
            level = page.evaluate("document.getElementById('level').value")
            assert engine == "running" and level > -60, (
                f"level meter: engine {engine}, {level} dB during the tone"
            )
            noise = wait_caption(
                page,
                lambda t: "white_noise" in t and "high_tone" not in t,
                30,
                "the white noise (after the tone)",
            )
            assert page.get_by_test_id("live-revision").is_visible()

            monitor = browser.new_page()
            monitor.goto(f"{stack.base}/monitor")
            card = monitor.locator(f'[data-testid="session-card"][data-session="{sid}"]')
            card.wait_for(timeout=10_000)
            expect(card.get_by_test_id("card-age")).to_have_text(re.compile(" ago$"), timeout=10_000)
            assert card.get_by_test_id("card-caption").inner_text().strip()
            monitor.close()

            page.locator("[data-testid=history] li").first.wait_for(timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
            page.get_by_test_id("stop").click()
            expect(page.get_by_test_id("state")).to_have_text(re.compile("^(ended|idle)$"), timeout=15_000)
            history = page.get_by_test_id("history").inner_text()
            assert "[00:00–00:04]" in history, history
            assert not [c for c in console if c.startswith("error")], console
            print(f"tone caption: {tone!r}; noise caption: {noise!r}")
        finally:
            browser.close()
            shutil.rmtree(profile, ignore_errors=True)
