"""Publish an audio file to the gateway over WebRTC (aiortc) and print the captions it sends back.

    python -m services.examples.webrtc_publish clip.wav --url http://127.0.0.1:8080

Signaling is one HTTP POST of the SDP offer to ``/api/webrtc/offer``; captions come back as
JSON messages on the "captions" data channel. The file plays in real time; when it ends the
server finalizes the session and sends an ``ended`` message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer


async def publish(
    path: str,
    url: str,
    config: dict[str, Any] | None = None,
    token: str | None = None,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """Stream ``path`` and return every caption-channel message received until ``ended``."""
    messages: list[dict[str, Any]] = []
    done = asyncio.Event()
    pc = RTCPeerConnection()
    player = MediaPlayer(path)
    try:
        channel = pc.createDataChannel("captions")

        @channel.on("message")
        def _on_message(raw: str) -> None:
            msg = json.loads(raw)
            messages.append(msg)
            if on_message is not None:
                on_message(msg)
            if msg.get("type") == "ended":
                done.set()

        if player.audio is None:
            raise ValueError(f"{path} has no audio track")

        @player.audio.on("ended")
        def _on_file_end() -> None:
            # WebRTC carries no end-of-track signal: tell the server the audio is over.
            if channel.readyState == "open":
                channel.send(json.dumps({"type": "stop"}))

        pc.addTrack(player.audio)
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers candidates here
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "config": config or {}}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.post(url.rstrip("/") + "/api/webrtc/offer", json=body, headers=headers) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"offer rejected ({resp.status}): {answer.get('error')}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await pc.close()
    return messages


def _print(msg: dict[str, Any]) -> None:
    if msg.get("type") == "caption":
        tag = "final" if msg.get("is_final") else f"interim r{msg.get('revision')}"
        print(f"[{msg['window_start']:6.1f}-{msg['window_end']:6.1f}] ({tag}) {msg['text']}", flush=True)
    else:
        print(f"# {json.dumps(msg)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="gateway web address")
    ap.add_argument("--token", default=None)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    config = {"prompt": args.prompt} if args.prompt else {}
    try:
        asyncio.run(publish(args.file, args.url, config, args.token, _print, args.timeout))
    except (RuntimeError, ValueError, TimeoutError, aiohttp.ClientError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
