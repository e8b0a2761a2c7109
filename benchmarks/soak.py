"""Soak: N real-time streams for M minutes through the whole local stack (`midasheng up`'s processes,
demo model), optionally under a flood of bad requests. Not run in CI.

Every stream sends 100 ms LINEAR16 chunks of a synthetic scene in real time (1 s hop, 10 s window,
interim results), finalizes after ``--stream-seconds`` and starts a new session, until the end.
Every ``--sample-seconds`` the RSS of every process and Redis's used memory are recorded: they
must stay flat. With ``--flood`` three more threads send bad requests as fast as they are answered
(invalid configs, garbage and bomb-like offline audio, special-token prompts, hijack attempts with
wrong secrets, cross-site and mistyped HTTP offers) and count the answers by status.

    python benchmarks/soak.py --streams 8 --minutes 5
    python benchmarks/soak.py --streams 8 --minutes 5 --flood

Prints a table of memory over time, then update lag (arrival of an interim caption minus the
moment the audio up to its window's end had been sent: p50/p95/max), captions, stream errors and
flood answers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
import soundfile as sf  # noqa: E402

from services.audio.io import float_to_pcm16_bytes  # noqa: E402
from services.cli.up import Stack, start_stack  # noqa: E402
from services.constants import SAMPLE_RATE as SR  # noqa: E402
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc  # noqa: E402
from services.training.synth import render_sound  # noqa: E402

CHUNK = SR // 10
SOUNDS = ("high_tone", "white_noise", "low_tone", "pink_noise", "siren")


def scene(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [render_sound(SOUNDS[i % len(SOUNDS)], rng, 3 * SR) for i in range(int(seconds // 3) + 1)]
    return np.concatenate(parts)[: int(seconds * SR)].astype(np.float32)


class Results:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lags: list[float] = []
        self.captions = 0
        self.sessions = 0
        self.errors: Counter[str] = Counter()
        self.flood: Counter[str] = Counter()


def stream_loop(target: str, seconds: float, stop: threading.Event, res: Results, seed: int) -> None:
    audio = scene(seconds, seed)
    chunks = [float_to_pcm16_bytes(audio[k : k + CHUNK]) for k in range(0, len(audio), CHUNK)]
    with grpc.insecure_channel(target) as channel:
        stub = captions_pb2_grpc.CaptionServiceStub(channel)
        while not stop.is_set():
            sent_at: dict[int, float] = {}
            cfg = captions_pb2.SessionConfig(
                sample_rate_hz=SR, encoding=captions_pb2.LINEAR16, channels=1, interim_results=True,
                window_seconds=10.0, hop_seconds=1.0,
            )  # fmt: skip

            def requests(
                cfg: captions_pb2.SessionConfig = cfg, sent_at: dict[int, float] = sent_at
            ) -> object:
                yield captions_pb2.StreamCaptionsRequest(config=cfg)
                t0 = time.monotonic()
                for i, data in enumerate(chunks):
                    delay = t0 + i * 0.1 - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    sent_at[i + 1] = time.monotonic()  # chunk i+1 ends at (i+1)/10 s
                    yield captions_pb2.StreamCaptionsRequest(
                        audio=captions_pb2.AudioChunk(data=data, seq=i + 1)
                    )
                    if stop.is_set():
                        break
                yield captions_pb2.StreamCaptionsRequest(
                    control=captions_pb2.Control(action=captions_pb2.Control.FINALIZE)
                )

            try:
                for r in stub.StreamCaptions(requests(), timeout=seconds + 180):
                    if r.WhichOneof("response") == "started":
                        with res.lock:
                            res.sessions += 1
                    elif r.WhichOneof("response") == "caption":
                        now = time.monotonic()
                        end_chunk = max(1, round(r.caption.window_end_seconds * 10))
                        with res.lock:
                            res.captions += 1
                            if not r.caption.is_final and end_chunk in sent_at:
                                res.lags.append(now - sent_at[end_chunk])
            except grpc.RpcError as e:
                with res.lock:
                    res.errors[e.code().name] += 1
                time.sleep(1)


def flood_loop(stack: Stack, stop: threading.Event, res: Results, kind: int) -> None:
    bomb = io.BytesIO()
    with sf.SoundFile(bomb, "w", samplerate=8000, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(10):
            f.write(np.zeros(8000 * 60, dtype=np.int16))
    bad_caption = [
        captions_pb2.CaptionRequest(encoded_audio=bomb.getvalue()),
        captions_pb2.CaptionRequest(encoded_audio=b"#EXTM3U\nhttp://127.0.0.1:9/x.ts\n"),
        captions_pb2.CaptionRequest(encoded_audio=np.random.bytes(4000)),
        captions_pb2.CaptionRequest(
            raw_audio=captions_pb2.RawAudio(data=b"\0\0" * SR, sample_rate_hz=SR), prompt="<|AUDIO|>" * 10
        ),
        captions_pb2.CaptionRequest(
            raw_audio=captions_pb2.RawAudio(data=b"\0\0" * SR, sample_rate_hz=SR), prompt="x" * 100_000
        ),
    ]
    bad_streams = [
        [captions_pb2.StreamCaptionsRequest(config=captions_pb2.SessionConfig(sample_rate_hz=1))],
        [captions_pb2.StreamCaptionsRequest(config=captions_pb2.SessionConfig(session_id="x" * 32, resume_secret="guess"))],
        [captions_pb2.StreamCaptionsRequest(audio=captions_pb2.AudioChunk(data=b"\0" * 200_000))],
    ]  # fmt: skip
    n = 0
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = captions_pb2_grpc.CaptionServiceStub(channel)
        while not stop.is_set():
            n += 1
            code = "OK"
            try:
                if kind == 0:
                    stub.Caption(bad_caption[n % len(bad_caption)], timeout=30)
                elif kind == 1:
                    for _ in stub.StreamCaptions(iter(bad_streams[n % len(bad_streams)]), timeout=10):
                        pass
                elif kind == 2 and stack.http:
                    body = json.dumps({"sdp": "v=0\r\n", "type": "offer"}).encode()
                    headers = [
                        {"Content-Type": "text/plain"},
                        {"Content-Type": "application/json", "Host": "evil.example"},
                    ]
                    req = urllib.request.Request(
                        stack.http + "api/webrtc/offer", data=body, headers=headers[n % 2]
                    )
                    try:
                        urllib.request.urlopen(req, timeout=10).close()
                    except urllib.error.HTTPError as e:
                        code = f"HTTP {e.code}"
                else:
                    stop.wait(0.01)
                    continue
            except grpc.RpcError as e:
                code = e.code().name
            with res.lock:
                res.flood[code] += 1


def sample(stack: Stack) -> dict[str, float]:
    out: dict[str, float] = {}
    for child in stack.children:
        try:
            out[child.name] = psutil.Process(child.process.pid).memory_info().rss / 2**20
        except psutil.Error:
            out[child.name] = float("nan")
    if stack.redis is not None:
        out["redis-server"] = psutil.Process(stack.redis.process.pid).memory_info().rss / 2**20
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    try:
        out["redis used"] = float(client.info("memory")["used_memory"]) / 2**20
    finally:
        client.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--stream-seconds", type=float, default=60.0, help="length of one session")
    p.add_argument("--sample-seconds", type=float, default=30.0)
    p.add_argument("--flood", action="store_true", help="also send bad requests from 3 threads")
    p.add_argument("--log", default="soak.log", help="where the stack's log lines go")
    args = p.parse_args()
    with open(args.log, "w") as log:
        stack = start_stack(gateway_port=0, http_port=_free_port(), device="cpu", out=log)
        res, stop = Results(), threading.Event()
        threads = [
            threading.Thread(
                target=stream_loop, args=(stack.gateway, args.stream_seconds, stop, res, i), daemon=True
            )
            for i in range(args.streams)
        ]
        if args.flood:
            threads += [
                threading.Thread(target=flood_loop, args=(stack, stop, res, k), daemon=True) for k in range(3)
            ]
        rows: list[tuple[float, dict[str, float]]] = [(0.0, sample(stack))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            while time.monotonic() - t0 < args.minutes * 60:
                time.sleep(min(args.sample_seconds, max(0.1, args.minutes * 60 - (time.monotonic() - t0))))
                rows.append((time.monotonic() - t0, sample(stack)))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=200)
            stack.stop()
    names = list(rows[0][1])
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; demo model, CPU")
    print(
        f"{args.streams} streams for {args.minutes:g} min{' under a flood of bad requests' if args.flood else ''}"
    )
    print("t (s) | " + " | ".join(f"{n} MiB" for n in names))
    for t, r in rows:
        print(f"{t:5.0f} | " + " | ".join(f"{r[n]:.0f}" for n in names))
    lags = sorted(res.lags)
    if lags:
        p50, p95 = statistics.median(lags), lags[int(0.95 * (len(lags) - 1))]
        print(f"update lag: p50 {p50:.2f} s, p95 {p95:.2f} s, max {lags[-1]:.2f} s over {len(lags)} interims")
    print(f"sessions {res.sessions}, captions {res.captions}, stream errors {dict(res.errors) or 'none'}")
    if args.flood:
        print(f"flood answers: {dict(res.flood)}")
    return 0


def _free_port() -> int:
    from services.transport.redis_server import free_port

    return free_port()


if __name__ == "__main__":
    raise SystemExit(main())
