"""``midasheng watch URL|FILE``: caption any source PyAV can open (HTTP/HLS/RTSP, Icecast, a file).

The source is decoded and resampled to 16 kHz mono once, then streamed into one StreamCaptions
session at the source's own pace (files are paced to real time). When a live source drops, the
session stays open (keep-alives) while the source is reopened with exponential backoff.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import av
import grpc
import numpy as np

from services.audio.io import float_to_pcm16_bytes
from services.cli.common import add_client_flags, client_from
from services.constants import SAMPLE_RATE
from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc

log = logging.getLogger(__name__)
CHUNK_SAMPLES = 1600  # 100 ms per gRPC message
QUEUE_CHUNKS = 300  # 30 s of audio buffered between the source and the stream; older audio is dropped
KEEPALIVE_S = 5.0
OPEN_TIMEOUT_S = 10.0


@dataclass
class Backoff:
    initial: float = 1.0
    maximum: float = 30.0
    current: float = 0.0

    def next(self) -> float:
        self.current = self.initial if self.current == 0 else min(self.maximum, self.current * 2)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


def is_live(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


class SourceReader:
    """Decodes ``source`` into 100 ms PCM chunks on a thread; reopens live sources with backoff."""

    def __init__(
        self, source: str, realtime: bool, loop: bool = False, max_reconnects: int | None = None
    ) -> None:
        self.source = source
        self.realtime = realtime
        self.loop = loop
        self.max_reconnects = max_reconnects
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.stop = threading.Event()
        self.dropped = 0
        self.reconnects = 0
        self.thread = threading.Thread(target=self._run, name="source-reader", daemon=True)

    def start(self) -> SourceReader:
        self.thread.start()
        return self

    def _put(self, chunk: bytes) -> None:
        while not self.stop.is_set():
            try:
                self.chunks.put(chunk, timeout=0.5)
                return
            except queue.Full:  # the stream is behind: drop the oldest audio, count it
                try:
                    self.chunks.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _decode_once(self) -> None:
        options = {"rw_timeout": str(int(OPEN_TIMEOUT_S * 1e6))} if is_live(self.source) else {}
        with av.open(self.source, options=options, timeout=OPEN_TIMEOUT_S) as container:
            if not container.streams.audio:
                raise ValueError(f"{self.source} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pending = np.zeros(0, dtype=np.float32)
            start, sent = time.monotonic(), 0
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
                while pending.size >= CHUNK_SAMPLES:
                    chunk, pending = pending[:CHUNK_SAMPLES], pending[CHUNK_SAMPLES:]
                    if self.realtime:
                        delay = start + sent / SAMPLE_RATE - time.monotonic()
                        if delay > 0 and self.stop.wait(delay):
                            return
                    self._put(float_to_pcm16_bytes(chunk))
                    sent += CHUNK_SAMPLES
                if self.stop.is_set():
                    return
            if pending.size:
                self._put(float_to_pcm16_bytes(pending))

    def _run(self) -> None:
        backoff = Backoff()
        try:
            while not self.stop.is_set():
                try:
                    self._decode_once()
                    backoff.reset()
                    if not (is_live(self.source) or self.loop):
                        return  # a file ended
                except Exception as e:  # the source dropped or cannot be opened
                    if not is_live(self.source):
                        log.error("cannot read %s: %s", self.source, e)
                        return
                    log.warning("source %s failed: %s", self.source, e)
                if self.max_reconnects is not None and self.reconnects >= self.max_reconnects:
                    log.error("giving up on %s after %d reconnects", self.source, self.reconnects)
                    return
                self.reconnects += 1
                delay = backoff.next()
                log.warning("reopening %s in %.0f s (attempt %d)", self.source, delay, self.reconnects)
                if self.stop.wait(delay):
                    return
        finally:
            self.chunks.put(None)  # end marker (the queue always has room for it eventually)


def requests(
    reader: SourceReader, cfg: captions_pb2.SessionConfig
) -> Iterator[captions_pb2.StreamCaptionsRequest]:
    yield captions_pb2.StreamCaptionsRequest(config=cfg)
    seq = 0
    while True:
        try:
            chunk = reader.chunks.get(timeout=KEEPALIVE_S)
        except queue.Empty:  # source reconnecting: keep the session alive
            yield captions_pb2.StreamCaptionsRequest(
                control=captions_pb2.Control(action=captions_pb2.Control.KEEP_ALIVE)
            )
            continue
        if chunk is None:
            break
        seq += 1
        yield captions_pb2.StreamCaptionsRequest(audio=captions_pb2.AudioChunk(data=chunk, seq=seq))
    yield captions_pb2.StreamCaptionsRequest(
        control=captions_pb2.Control(action=captions_pb2.Control.FINALIZE)
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch",
        help="caption a live source (HTTP/HLS/RTSP/Icecast URL) or a file in real time",
        description="Ingest any source PyAV can open into a caption session, print captions, and "
        "show the session on the monitoring page. Live sources are reopened with backoff when they drop.",
    )
    p.add_argument("source", metavar="URL|FILE")
    p.add_argument("--server", default="127.0.0.1:50051", help="gateway address (default: 127.0.0.1:50051)")
    p.add_argument("--prompt", default="", help="question asked about the audio")
    p.add_argument("--window", type=float, default=0.0, help="caption window in seconds (default: 10)")
    p.add_argument("--hop", type=float, default=0.0, help="seconds between updates (default: 2)")
    p.add_argument("--adapter", default="", help="LoRA adapter name")
    p.add_argument("--no-interim", dest="interim", action="store_false", help="only final captions")
    p.add_argument(
        "--fast", action="store_true", help="read files as fast as possible instead of in real time"
    )
    p.add_argument("--loop", action="store_true", help="play a file again and again")
    p.add_argument("--max-reconnects", type=int, default=None, help="give up after this many reopen attempts")
    add_client_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reader = SourceReader(
        args.source, realtime=not args.fast, loop=args.loop, max_reconnects=args.max_reconnects
    ).start()
    cfg = captions_pb2.SessionConfig(
        sample_rate_hz=SAMPLE_RATE,
        encoding=captions_pb2.LINEAR16,
        channels=1,
        interim_results=args.interim,
        window_seconds=args.window,
        hop_seconds=args.hop,
        prompt=args.prompt,
        adapter=args.adapter,
    )
    from services.cli.stream import print_event

    try:
        with client_from(args).channel(args.server) as channel:
            stub = captions_pb2_grpc.CaptionServiceStub(channel)
            for resp in stub.StreamCaptions(requests(reader, cfg)):
                print_event(resp)
    except grpc.RpcError as e:
        print(f"midasheng watch: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        reader.stop.set()
    if reader.dropped:
        print(
            f"# dropped {reader.dropped} chunks (100 ms each) because the stream fell behind", file=sys.stderr
        )
    return 0
