"""Caption events: the records a session's caption stream carries, and their codecs.

LM workers (and a gateway giving up on a session) append events to ``mdl:s:{sid}:captions``;
gateways read them back by entry id, which is the event id and the resume cursor. Each event is
a typed record here, with one codec per wire:

====================  =======================================================================
Redis stream entry    ``to_fields`` / ``from_fields``: flat string hashes, readable in
                      ``redis-cli`` (schema in ``docs/architecture.md``)
protobuf              ``to_pb``: ``StreamCaptionsResponse`` (captions.proto)
JSON                  ``to_json``: the page's data channel, downloads and the monitoring view
====================  =======================================================================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from services.audio.subtitles import TimedCaption
from services.errors import InvalidArgument
from services.pb.midasheng.v1 import captions_pb2
from services.transport import keys
from services.transport.streams import StreamClient

TYPE_FIELD = "type"


class EndReason(enum.StrEnum):
    END_OF_STREAM = "end_of_stream"  # the client finalized (or closed) the stream
    ERROR = "error"  # the session could not go on (an error event precedes the end)
    IDLE = "idle"  # no audio for the idle timeout (set by the gateway that saw it)


_END_REASON_PB = {
    EndReason.END_OF_STREAM: captions_pb2.SessionEnded.CLIENT_CLOSED,
    EndReason.ERROR: captions_pb2.SessionEnded.ERROR,
    EndReason.IDLE: captions_pb2.SessionEnded.IDLE_TIMEOUT,
}


def _f3(x: float) -> str:
    return f"{x:.3f}"


def _flag(x: bool) -> str:
    return "1" if x else "0"


@dataclass(frozen=True)
class CaptionEvent:
    """A caption of window [window_start, window_end) s of stream time, revision of its segment."""

    segment_id: int
    revision: int
    window_start: float  # s
    window_end: float  # s
    text: str
    is_final: bool
    audio_seconds: float = 0.0  # s of audio the stream had received when this was made
    adapter: str = ""
    event_id: str = ""  # the stream entry id; empty until stored
    question_id: str = ""  # "" = a caption; else the answer to the session's question of this id
    answer: bool | None = None  # an answer read as yes/no (services.monitor.answers.yes_no)

    TYPE = "caption"

    @property
    def is_answer(self) -> bool:
        return bool(self.question_id)

    def to_fields(self) -> dict[str, str]:
        return {
            TYPE_FIELD: self.TYPE,
            "segment_id": str(self.segment_id),
            "revision": str(self.revision),
            "window_start": _f3(self.window_start),
            "window_end": _f3(self.window_end),
            "text": self.text,
            "is_final": _flag(self.is_final),
            "audio_seconds": _f3(self.audio_seconds),
            "adapter": self.adapter,
            **(
                {"question_id": self.question_id, "answer": "" if self.answer is None else _flag(self.answer)}
                if self.question_id
                else {}
            ),
        }

    def to_pb(self) -> captions_pb2.StreamCaptionsResponse:
        return captions_pb2.StreamCaptionsResponse(
            caption=captions_pb2.CaptionEvent(
                event_id=self.event_id,
                segment_id=self.segment_id,
                revision=self.revision,
                window_start_seconds=self.window_start,
                window_end_seconds=self.window_end,
                text=self.text,
                is_final=self.is_final,
                audio_processed_seconds=self.audio_seconds,
                adapter=self.adapter,
                question_id=self.question_id,
                answer=_YES_NO_PB[self.answer],
            )
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "event_id": self.event_id,
            "segment_id": self.segment_id,
            "revision": self.revision,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "text": self.text,
            "is_final": self.is_final,
            "audio_seconds": self.audio_seconds,
            "adapter": self.adapter,
            "question_id": self.question_id,
            "answer": self.answer,
        }


_YES_NO_PB = {
    None: captions_pb2.CaptionEvent.YES_NO_UNSPECIFIED,
    True: captions_pb2.CaptionEvent.YES,
    False: captions_pb2.CaptionEvent.NO,
}
_YES_NO_TEXT = {"": None, "1": True, "0": False}


@dataclass(frozen=True)
class ErrorEvent:
    """Something the client must know: ``fatal`` errors are followed by the end."""

    message: str
    reason: str  # a stable UPPER_SNAKE word, e.g. PUBLICATION_SKIPPED, ENCODER_STATE_LOST
    fatal: bool
    code: str = ""  # a gRPC status name; "" = INTERNAL when fatal, DATA_LOSS otherwise
    event_id: str = ""

    TYPE = "error"

    def status(self) -> grpc.StatusCode:
        default = grpc.StatusCode.INTERNAL if self.fatal else grpc.StatusCode.DATA_LOSS
        return grpc.StatusCode.__members__.get(self.code, default)

    def to_fields(self) -> dict[str, str]:
        out = {
            TYPE_FIELD: self.TYPE,
            "message": self.message,
            "reason": self.reason,
            "fatal": _flag(self.fatal),
        }
        if self.code:
            out["code"] = self.code
        return out

    def to_pb(self) -> captions_pb2.StreamCaptionsResponse:
        return captions_pb2.StreamCaptionsResponse(
            error=captions_pb2.StreamError(
                code=self.status().value[0], message=self.message, reason=self.reason, fatal=self.fatal
            )
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "event_id": self.event_id,
            "message": self.message,
            "reason": self.reason,
            "fatal": self.fatal,
        }


@dataclass(frozen=True)
class EndEvent:
    """The last event of a session."""

    reason: EndReason
    audio_seconds: float = 0.0  # s of audio the session received
    event_id: str = ""

    TYPE = "end"

    def to_fields(self) -> dict[str, str]:
        return {TYPE_FIELD: self.TYPE, "reason": self.reason.value, "audio_seconds": _f3(self.audio_seconds)}

    def to_pb(self, last_caption_id: str = "") -> captions_pb2.StreamCaptionsResponse:
        return captions_pb2.StreamCaptionsResponse(
            ended=captions_pb2.SessionEnded(
                reason=_END_REASON_PB.get(self.reason, captions_pb2.SessionEnded.REASON_UNSPECIFIED),
                total_audio_seconds=self.audio_seconds,
                last_event_id=last_caption_id,
            )
        )

    def to_json(self) -> dict[str, Any]:
        # "ended" on the page's channel, like its other control messages ("started").
        return {
            "type": "ended",
            "event_id": self.event_id,
            "reason": self.reason.value,
            "audio_seconds": self.audio_seconds,
        }


@dataclass(frozen=True)
class AlertEvent:
    """A monitoring rule fired on the session (written by the gateway that takes its audio)."""

    alert_id: str
    rule_id: str
    kind: str  # the rule's kind (services.monitor.rules.KINDS)
    text: str
    window_start: float  # s of stream time
    window_end: float  # s
    question_id: str = ""
    fired_at: float = 0.0  # unix s
    has_clip: bool = False
    event_id: str = ""

    TYPE = "alert"

    def to_fields(self) -> dict[str, str]:
        return {
            TYPE_FIELD: self.TYPE,
            "alert_id": self.alert_id,
            "rule_id": self.rule_id,
            "kind": self.kind,
            "text": self.text,
            "window_start": _f3(self.window_start),
            "window_end": _f3(self.window_end),
            "question_id": self.question_id,
            "fired_at": _f3(self.fired_at),
            "has_clip": _flag(self.has_clip),
        }

    def to_pb(self) -> captions_pb2.StreamCaptionsResponse:
        return captions_pb2.StreamCaptionsResponse(
            alert=captions_pb2.AlertEvent(
                event_id=self.event_id,
                alert_id=self.alert_id,
                rule_id=self.rule_id,
                kind=self.kind,
                text=self.text,
                window_start_seconds=self.window_start,
                window_end_seconds=self.window_end,
                question_id=self.question_id,
                fired_at=self.fired_at,
                has_clip=self.has_clip,
            )
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "event_id": self.event_id,
            "alert_id": self.alert_id,
            "rule_id": self.rule_id,
            "kind": self.kind,
            "text": self.text,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "question_id": self.question_id,
            "fired_at": self.fired_at,
            "has_clip": self.has_clip,
        }


Event = CaptionEvent | ErrorEvent | EndEvent | AlertEvent


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def from_fields(event_id: str, raw: Mapping[bytes, bytes] | Mapping[str, str]) -> Event:
    """A caption-stream entry -> its event. Raises InvalidArgument for an entry no writer makes."""
    f = {_text(k): _text(v) for k, v in raw.items()}
    kind = f.get(TYPE_FIELD, CaptionEvent.TYPE)
    try:
        if kind == CaptionEvent.TYPE:
            return CaptionEvent(
                segment_id=int(f["segment_id"]),
                revision=int(f["revision"]),
                window_start=float(f["window_start"]),
                window_end=float(f["window_end"]),
                text=f.get("text", ""),
                is_final=f.get("is_final") == "1",
                audio_seconds=float(f.get("audio_seconds") or 0.0),
                adapter=f.get("adapter", ""),
                event_id=event_id,
                question_id=f.get("question_id", ""),
                answer=_YES_NO_TEXT[f.get("answer", "")],
            )
        if kind == ErrorEvent.TYPE:
            return ErrorEvent(
                message=f.get("message", ""),
                reason=f.get("reason", "CAPTION_WORKER"),
                fatal=f.get("fatal") == "1",
                code=f.get("code", ""),
                event_id=event_id,
            )
        if kind == AlertEvent.TYPE:
            return AlertEvent(
                alert_id=f["alert_id"],
                rule_id=f["rule_id"],
                kind=f["kind"],
                text=f.get("text", ""),
                window_start=float(f["window_start"]),
                window_end=float(f["window_end"]),
                question_id=f.get("question_id", ""),
                fired_at=float(f.get("fired_at") or 0.0),
                has_clip=f.get("has_clip") == "1",
                event_id=event_id,
            )
        if kind == EndEvent.TYPE:
            reason = f.get("reason", "")
            return EndEvent(
                reason=EndReason(reason) if reason in EndReason._value2member_map_ else EndReason.ERROR,
                audio_seconds=float(f.get("audio_seconds") or 0.0),
                event_id=event_id,
            )
    except (KeyError, ValueError) as e:
        raise InvalidArgument(f"caption-stream entry {event_id} of type {kind!r} is malformed: {e!r}") from e
    raise InvalidArgument(f"caption-stream entry {event_id} has unknown type {kind!r}")


def final_captions(events: Sequence[Event]) -> list[TimedCaption]:
    """The final caption of every segment, in stream order (a redelivered final replaces the
    earlier); answers to questions are not captions."""
    finals = {
        ev.segment_id: TimedCaption(ev.window_start, ev.window_end, ev.text)
        for ev in events
        if isinstance(ev, CaptionEvent) and ev.is_final and not ev.is_answer
    }
    return [finals[k] for k in sorted(finals)]


class CaptionStream:
    """A session's caption stream in Redis: the one place events are appended and read back
    (the LM worker's atomic apply writes ``to_fields()`` of these records through its script)."""

    def __init__(self, streams: StreamClient, maxlen: int) -> None:
        self.streams = streams
        self.maxlen = maxlen

    def append(self, sid: str, event: Event) -> str:
        return self.streams.add(keys.session_captions(sid), event.to_fields(), self.maxlen)

    def end_with_error(
        self, sid: str, message: str, code: str, reason: str, audio_seconds: float = 0.0
    ) -> None:
        """End a session for its clients: a fatal error event, then the end."""
        self.append(sid, ErrorEvent(message=message, reason=reason, fatal=True, code=code))
        self.append(sid, EndEvent(EndReason.ERROR, audio_seconds))

    def read(self, sid: str, after: str, block_ms: int, count: int = 100) -> list[Event]:
        """Events after entry id ``after`` ("" = from the start), waiting at most ``block_ms``."""
        res = self.streams.client.xread(
            {keys.session_captions(sid): after or "0-0"}, count=count, block=max(1, block_ms)
        )
        return [from_fields(_text(i), f) for _stream, entries in res or [] for i, f in entries]

    def all(self, sid: str) -> list[Event]:
        entries = self.streams.client.xrange(keys.session_captions(sid), "-", "+", count=self.maxlen)
        return [from_fields(_text(i), f) for i, f in entries]

    def latest(self, sid: str, count: int) -> list[Event]:
        """The newest ``count`` events, newest first."""
        entries = self.streams.client.xrevrange(keys.session_captions(sid), "+", "-", count=count)
        return [from_fields(_text(i), f) for i, f in entries]

    def has_ended(self, sid: str) -> bool:
        last = self.latest(sid, 1)
        return bool(last) and isinstance(last[0], EndEvent)
