"""Stream an audio file through the client library (asyncio) in real time and print its events.

    python -m services.examples.client_stream clip.wav --server 127.0.0.1:50051 [--speed 4]

The API key comes from ``$MIDASHENG_API_KEY`` when the gateway has keys. Stop the gateway and
start it again while this runs: the stream resumes where it was, nothing lost or repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from services.audio.io import decode_audio, float_to_pcm16_bytes
from services.client import AsyncCaptionClient
from services.constants import SAMPLE_RATE
from services.pb.midasheng.v1 import captions_pb2

CHUNK_SECONDS = 0.1


async def stream_file(path: str, server: str, speed: float = 1.0, api_key: str | None = None) -> int:
    audio = decode_audio(path)
    step = int(CHUNK_SECONDS * SAMPLE_RATE)
    async with AsyncCaptionClient(server, api_key=api_key) as client:
        async with client.stream(sample_rate_hz=SAMPLE_RATE, interim_results=True) as stream:

            async def feed() -> None:
                for k in range(0, len(audio), step):
                    await stream.send(float_to_pcm16_bytes(audio[k : k + step]))
                    await asyncio.sleep(CHUNK_SECONDS / speed)
                await stream.finalize()

            feeder = asyncio.create_task(feed())
            async for event in stream:
                if isinstance(event, captions_pb2.CaptionEvent):
                    mark = "final  " if event.is_final else "interim"
                    span = f"{event.window_start_seconds:6.1f}-{event.window_end_seconds:6.1f} s"
                    print(f"{mark} {span}  {event.text}", flush=True)
                elif isinstance(event, captions_pb2.StreamError):
                    print(f"error   {event.reason}: {event.message}", file=sys.stderr)
                else:
                    print(
                        f"ended   {event.total_audio_seconds:.1f} s of audio, {stream.reconnects.count} reconnect(s)"
                    )
            await feeder
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    args = ap.parse_args()
    if args.speed <= 0:
        ap.error("--speed must be > 0")
    return asyncio.run(stream_file(args.file, args.server, args.speed, os.environ.get("MIDASHENG_API_KEY")))


if __name__ == "__main__":
    sys.exit(main())
