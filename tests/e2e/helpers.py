"""Helpers shared by the live-path integration tests: audio, request streams, response checks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from services.audio.io import float_to_pcm16_bytes
from services.pb.midasheng.v1 import captions_pb2
from services.training.synth import render_sound

SR = 16000
CHUNK = 1600  # 100 ms at 16 kHz
STREAM_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 30.0  # calls expected to fail or finish quickly


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
