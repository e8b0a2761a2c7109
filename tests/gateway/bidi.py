"""A minimal WebDriver BiDi client for driving the system Firefox in tests.

Firefox speaks WebDriver BiDi itself when started with ``--remote-debugging-port`` (no geckodriver
and no patched browser build): one WebSocket, JSON commands with ids, replies and events. Only the
handful of commands the page tests need are wrapped here.
"""

from __future__ import annotations

import asyncio
import base64
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")

# Automation prefs for a quiet, offline, permission-free headless Firefox with a fake microphone.
BASE_PREFS: dict[str, Any] = {
    "media.navigator.streams.fake": True,  # getUserMedia gets a generated sine tone
    "media.navigator.permission.disabled": True,  # no permission prompt
    "media.autoplay.default": 0,
    "media.peerconnection.ice.loopback": True,  # the gateway listens on loopback
    "media.peerconnection.ice.obfuscate_host_addresses": False,  # real host candidates, no mDNS names
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.captive-portal-service.enabled": False,
}


class BidiError(RuntimeError):
    pass


def write_profile(profile: Path, prefs: dict[str, Any]) -> None:
    profile.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, v in {**BASE_PREFS, **prefs}.items():
        val = (
            ("true" if v else "false")
            if isinstance(v, bool)
            else (repr(v) if isinstance(v, int) else f'"{v}"')
        )
        lines.append(f'user_pref("{k}", {val});')
    (profile / "user.js").write_text("\n".join(lines) + "\n")


class Firefox:
    """A headless Firefox process with its BiDi endpoint; stderr is drained (kept for failures)."""

    def __init__(self, binary: str, profile: Path, start_timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [
                binary,
                "-headless",
                "-no-remote",
                "-profile",
                str(profile),
                "--remote-debugging-port",
                "0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.log: list[str] = []
        found: queue.Queue[str] = queue.Queue(maxsize=1)
        self._drainer = threading.Thread(target=self._drain, args=(found,), daemon=True)
        self._drainer.start()
        try:
            self.url = found.get(timeout=start_timeout) + "/session"
        except queue.Empty:
            self.close()
            raise BidiError(
                f"Firefox did not open its BiDi port within {start_timeout:.0f} s:\n"
                + "\n".join(self.log[-20:])
            ) from None

    def _drain(self, found: queue.Queue[str]) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            del self.log[:-500]
            m = LISTENING.search(line)
            if m and found.empty():
                found.put(m.group(1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._drainer.join(timeout=10)  # EOF once every writer of the pipe exited
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Session:
    """One BiDi session over an open WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    async def cmd(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        self._next_id += 1
        mid = self._next_id
        await self.ws.send_json({"id": mid, "method": method, "params": params or {}})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BidiError(f"{method}: no reply within {timeout:.0f} s")
            msg = await asyncio.wait_for(self.ws.receive(), left)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise BidiError(f"{method}: the BiDi connection closed ({msg.type.name})")
            data = msg.json()
            if data.get("type") == "event":
                self.events.append(data)
            elif data.get("id") == mid:
                if data.get("type") == "error":
                    raise BidiError(f"{method}: {data.get('error')}: {data.get('message')}")
                return data["result"]

    async def eval(self, context: str, expression: str, user_activation: bool = False) -> Any:
        r = await self.cmd(
            "script.evaluate",
            {
                "expression": expression,
                "target": {"context": context},
                "awaitPromise": True,
                "userActivation": user_activation,
            },
        )
        if r["type"] == "exception":
            raise BidiError(f"{expression!r} threw: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    async def wait_for(self, context: str, expression: str, timeout: float, what: str) -> Any:
        """Polls ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.eval(context, expression)
            if last:
                return last
            await asyncio.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout:.0f} s (last value {last!r})")

    async def navigate(self, context: str, url: str) -> None:
        await self.cmd("browsingContext.navigate", {"context": context, "url": url, "wait": "complete"})

    async def new_tab(self) -> str:
        return str((await self.cmd("browsingContext.create", {"type": "tab"}))["context"])

    async def screenshot(self, context: str, path: Path) -> None:
        r = await self.cmd("browsingContext.captureScreenshot", {"context": context, "origin": "document"})
        path.write_bytes(base64.b64decode(r["data"]))

    def console(self, level: str | None = None) -> list[str]:
        return [
            f"{e['params'].get('level')}: {e['params'].get('text')}"
            for e in self.events
            if e.get("method") == "log.entryAdded" and (level is None or e["params"].get("level") == level)
        ]
