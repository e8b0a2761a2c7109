"""Helpers shared by the live-path integration tests: audio, request streams, response checks."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from services.audio.io import float_to_pcm16_bytes
from services.pb.midasheng.v1 import captions_pb2
from services.training.synth import render_sound

SR = 16000
CHUNK = 1600  # 100 ms at 16 kHz
STREAM_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 30.0  # calls expected to fail or finish quickly
READY_TIMEOUT_S = 120.0  # a tier process prints 'ready on port N' within this
SPEED = 3.0  # paced audio is sent at 3x real time
ROOT = Path(__file__).resolve().parents[2]


def clip(parts: Sequence[tuple[str, float]], seed: int = 0) -> np.ndarray:
    """Concatenated synthetic sounds at 16 kHz, e.g. [("high_tone", 10), ("white_noise", 10)]."""
    rng = np.random.default_rng(seed)
    return np.concatenate([render_sound(name, rng, int(round(sec * SR))) for name, sec in parts]).astype(
        np.float32
    )


# Resume secrets of the sessions the tests started (session id -> SessionStarted.resume_secret):
# config(session_id=...) sends the session's secret, as a real client keeps it with the id.
SECRETS: dict[str, str] = {}


def remember(resp: captions_pb2.StreamCaptionsResponse) -> captions_pb2.StreamCaptionsResponse:
    """Keep the resume secret of a ``started`` response (returned unchanged)."""
    if resp.WhichOneof("response") == "started" and resp.started.resume_secret:
        SECRETS[resp.started.session_id] = resp.started.resume_secret
    return resp


def config(**kw: object) -> captions_pb2.StreamCaptionsRequest:
    base: dict[str, object] = dict(
        sample_rate_hz=SR, encoding=captions_pb2.LINEAR16, channels=1, interim_results=True
    )
    sid = kw.get("session_id")
    if isinstance(sid, str) and sid in SECRETS and "resume_secret" not in kw:
        base["resume_secret"] = SECRETS[sid]
    base.update(kw)
    return captions_pb2.StreamCaptionsRequest(config=captions_pb2.SessionConfig(**base))  # type: ignore[arg-type]


def audio_req(data: bytes, seq: int = 0) -> captions_pb2.StreamCaptionsRequest:
    return captions_pb2.StreamCaptionsRequest(audio=captions_pb2.AudioChunk(data=data, seq=seq))


def control(action: int) -> captions_pb2.StreamCaptionsRequest:
    return captions_pb2.StreamCaptionsRequest(control=captions_pb2.Control(action=action))  # type: ignore[arg-type]


def pcm_chunks(audio: np.ndarray, chunk: int = CHUNK) -> list[bytes]:
    return [float_to_pcm16_bytes(audio[k : k + chunk]) for k in range(0, len(audio), chunk)]


def requests_for(
    audio: np.ndarray, first_seq: int = 1, **cfg: object
) -> Iterator[captions_pb2.StreamCaptionsRequest]:
    """Config, 100 ms LINEAR16 chunks numbered from ``first_seq``, then a half-close."""
    yield config(**cfg)
    for i, data in enumerate(pcm_chunks(audio)):
        yield audio_req(data, first_seq + i)


class Feeder:
    """A request iterator the test drives: put() messages, close() to half-close.

    Every wait is bounded: the iterator half-closes on its own after ``idle_s`` without messages,
    so a gRPC sender thread never hangs past a test.
    """

    _CLOSE = object()

    def __init__(self, idle_s: float = 60.0) -> None:
        self._q: queue.Queue[object] = queue.Queue()
        self.idle_s = idle_s
        self.closed = threading.Event()

    def put(self, *reqs: captions_pb2.StreamCaptionsRequest) -> None:
        for r in reqs:
            self._q.put(r)

    def close(self) -> None:
        self._q.put(self._CLOSE)

    def __iter__(self) -> Iterator[captions_pb2.StreamCaptionsRequest]:
        try:
            while True:
                try:
                    item = self._q.get(timeout=self.idle_s)
                except queue.Empty:
                    return
                if item is self._CLOSE:
                    return
                yield item  # type: ignore[misc]
        finally:
            self.closed.set()


@dataclass
class Collected:
    responses: list[captions_pb2.StreamCaptionsResponse] = field(default_factory=list)
    error: grpc.RpcError | None = None

    def kinds(self) -> list[str]:
        return [str(r.WhichOneof("response")) for r in self.responses]

    @property
    def started(self) -> captions_pb2.SessionStarted:
        assert self.responses and self.responses[0].WhichOneof("response") == "started", self.kinds()[:3]
        return self.responses[0].started

    @property
    def captions(self) -> list[captions_pb2.CaptionEvent]:
        return [r.caption for r in self.responses if r.WhichOneof("response") == "caption"]

    @property
    def finals(self) -> list[captions_pb2.CaptionEvent]:
        return [c for c in self.captions if c.is_final and not c.question_id]  # captions, not answers

    @property
    def errors(self) -> list[captions_pb2.StreamError]:
        return [r.error for r in self.responses if r.WhichOneof("response") == "error"]

    @property
    def ended(self) -> captions_pb2.SessionEnded:
        assert self.responses and self.responses[-1].WhichOneof("response") == "ended", self.kinds()[-3:]
        return self.responses[-1].ended

    def table(self) -> str:
        """Readable dump of the events for assertion messages."""
        rows = []
        for r in self.responses:
            k = r.WhichOneof("response")
            if k == "caption":
                c = r.caption
                rows.append(
                    f"  caption {c.event_id} seg={c.segment_id} rev={c.revision} "
                    f"[{c.window_start_seconds:.1f},{c.window_end_seconds:.1f}] final={c.is_final} {c.text!r}"
                )
            else:
                rows.append(f"  {k}: {str(getattr(r, k)).strip()[:160]!r}")
        return "\n".join(rows)


def collect(call: Iterator[captions_pb2.StreamCaptionsResponse]) -> Collected:
    """Read a StreamCaptions call to its end; a failing status is kept, not raised."""
    out = Collected()
    try:
        for r in call:
            out.responses.append(remember(r))
    except grpc.RpcError as e:
        out.error = e
    return out


def event_key(event_id: str) -> tuple[int, int]:
    """A Redis stream entry id as a sortable pair (the tests know the cursor's implementation)."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class Tier:
    """``python -m services CMD ARGS`` as a child process (its own session, so that signals reach
    it alone); ready once it prints 'ready on port N'. stderr goes to ``log``."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log: Path,
        env: Mapping[str, str] = {"OMP_NUM_THREADS": "1"},  # noqa: B006  (read only)
    ) -> None:
        self.name = name
        self.log = log
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        )
        self.port = 0
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r"ready on port (\d+)", line)
            if m and not self.ready.is_set():
                self.port = int(m.group(1))
                self.ready.set()

    def wait_ready(self) -> Tier:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.wait(0.2):
            assert self.proc.poll() is None, f"{self.name} exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{self.name} not ready: {self.log.read_text()[-2000:]}"
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def paced(audio: np.ndarray, **cfg: object) -> Iterator[captions_pb2.StreamCaptionsRequest]:
    """A session config, then ``audio`` in 100 ms chunks at ``SPEED`` times real time."""
    yield config(**cfg)
    start = time.monotonic()
    for i, data in enumerate(pcm_chunks(audio)):
        delay = start + i * CHUNK / SR / SPEED - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield audio_req(data, i + 1)
