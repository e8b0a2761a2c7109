"""``midasheng stream FILE --server HOST:PORT``: stream a file through StreamCaptions, print captions."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from services.audio.io import decode_audio, float_to_pcm16_bytes
from services.cli.common import add_client_flags, client_from
from services.constants import SAMPLE_RATE
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc
from services.security import ClientCredentials

CHUNK_SECONDS = 0.1


def requests(
    audio: np.ndarray, cfg: captions_pb2.SessionConfig, speed: float
) -> Iterator[captions_pb2.StreamCaptionsRequest]:
    yield captions_pb2.StreamCaptionsRequest(config=cfg)
    step = int(CHUNK_SECONDS * SAMPLE_RATE)
    start = time.monotonic()
    for i, k in enumerate(range(0, len(audio), step)):
        if speed > 0:
            delay = start + i * CHUNK_SECONDS / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield captions_pb2.StreamCaptionsRequest(
            audio=captions_pb2.AudioChunk(data=float_to_pcm16_bytes(audio[k : k + step]), seq=i + 1)
        )
    yield captions_pb2.StreamCaptionsRequest(
        control=captions_pb2.Control(action=captions_pb2.Control.FINALIZE)
    )


def stream_file(
    path: Path,
    server: str,
    speed: float = 1.0,
    interim: bool = True,
    window: float = 0.0,
    hop: float = 0.0,
    prompt: str = "",
    adapter: str = "",
    token: str | None = None,
    timeout: float | None = None,
    credentials: ClientCredentials | None = None,
) -> Iterator[captions_pb2.StreamCaptionsResponse]:
    audio = decode_audio(path)
    cfg = captions_pb2.SessionConfig(
        sample_rate_hz=SAMPLE_RATE,
        encoding=captions_pb2.LINEAR16,
        channels=1,
        interim_results=interim,
        window_seconds=window,
        hop_seconds=hop,
        prompt=prompt,
        adapter=adapter,
    )
    creds = credentials or ClientCredentials(token=token)
    with creds.channel(server) as channel:
        stub = captions_pb2_grpc.CaptionServiceStub(channel)
        yield from stub.StreamCaptions(requests(audio, cfg, speed), timeout=timeout)


def _clock(t: float) -> str:
    return f"{int(t // 60):02d}:{t % 60:04.1f}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        help="stream an audio file to a running server and print live captions",
        description="Play FILE into the StreamCaptions API in real time (or faster) and print "
        "interim and final captions as they arrive.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--server", default="127.0.0.1:50051", help="gateway address (default: 127.0.0.1:50051)")
    p.add_argument(
        "--speed", type=float, default=1.0, help="playback speed; 0 = as fast as possible (default: 1)"
    )
    p.add_argument("--no-interim", dest="interim", action="store_false", help="only final captions")
    p.add_argument(
        "--window", type=float, default=0.0, help="caption window in seconds (default: server's, 10)"
    )
    p.add_argument("--hop", type=float, default=0.0, help="seconds between updates (default: server's, 2)")
    p.add_argument("--prompt", default="", help="question asked about the audio")
    p.add_argument("--adapter", default="", help="LoRA adapter name")
    add_client_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.set_defaults(func=run)


def print_event(resp: captions_pb2.StreamCaptionsResponse, as_json: bool = False) -> None:
    kind = resp.WhichOneof("response")
    if as_json:
        from google.protobuf.json_format import MessageToDict

        print(
            json.dumps({kind: MessageToDict(getattr(resp, kind), preserving_proto_field_name=True)}),
            flush=True,
        )
    elif kind == "started":
        print(f"# session {resp.started.session_id}", flush=True)
    elif kind == "caption":
        c = resp.caption
        tag = "final" if c.is_final else f"interim r{c.revision}"
        print(
            f"[{_clock(c.window_start_seconds)}-{_clock(c.window_end_seconds)}] ({tag}) {c.text}", flush=True
        )
    elif kind == "error":
        print(f"# error: {resp.error.message}", file=sys.stderr, flush=True)
    elif kind == "ended":
        print(f"# ended after {resp.ended.total_audio_seconds:.1f} s of audio", flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        for resp in stream_file(
            args.file,
            args.server,
            args.speed,
            args.interim,
            args.window,
            args.hop,
            args.prompt,
            args.adapter,
            None,
            args.timeout,
            client_from(args),
        ):
            print_event(resp, args.json)
    except grpc.RpcError as e:
        print(f"midasheng stream: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0
