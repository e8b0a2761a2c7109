"""Caption events: each codec round-trips, and the Redis codec reads what the writers write."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import redis

from services.errors import InvalidArgument
from services.pb.midasheng.v1 import captions_pb2
from services.transport.streams import StreamClient
from services.wire.events import (
    AlertEvent,
    CaptionEvent,
    CaptionStream,
    EndEvent,
    EndReason,
    ErrorEvent,
    Event,
    final_captions,
    from_fields,
)

CAPTION = CaptionEvent(
    segment_id=3,
    revision=2,
    window_start=30.0,
    window_end=38.4,
    text="A dog barks. 犬が吠える",
    is_final=True,
    audio_seconds=38.6,
    adapter="siren",
)
ANSWERS = [
    dataclasses.replace(CAPTION, question_id="baby", text=t, answer=a)
    for t, a in (("Yes, a baby is crying.", True), ("No.", False), ("A dog.", None))
]
ERROR = ErrorEvent(message="skipped one", reason="PUBLICATION_SKIPPED", fatal=False)
FATAL = ErrorEvent(message="gone", reason="ENCODER_STATE_LOST", fatal=True, code="FAILED_PRECONDITION")
END = EndEvent(EndReason.IDLE, 12.25)
ALERT = AlertEvent("1700000000000-ab12", "baby", "answer_true", "Yes.", 10.0, 20.0, "cry", 1.7e9, True)
EVENTS: list[Event] = [CAPTION, *ANSWERS, ALERT, ERROR, FATAL, END]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_redis_fields_round_trip(event: Event) -> None:
    fields = event.to_fields()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    as_bytes = {k.encode(): v.encode() for k, v in fields.items()}  # what redis-py hands back
    assert from_fields("17-0", as_bytes) == _with_id(event, "17-0")
    assert from_fields("17-0", fields) == _with_id(event, "17-0")


def _with_id(event: Event, event_id: str) -> Event:
    from dataclasses import replace

    return replace(event, event_id=event_id)


def test_caption_pb_and_json_carry_every_field() -> None:
    ev = _with_id(CAPTION, "5-1")
    assert isinstance(ev, CaptionEvent)
    pb = ev.to_pb().caption
    assert (pb.event_id, pb.segment_id, pb.revision, pb.text, pb.is_final, pb.adapter) == (
        "5-1",
        3,
        2,
        CAPTION.text,
        True,
        "siren",
    )
    assert (pb.window_start_seconds, pb.window_end_seconds) == pytest.approx((30.0, 38.4))
    assert pb.audio_processed_seconds == pytest.approx(38.6)
    js = ev.to_json()
    assert js == {
        "type": "caption",
        "event_id": "5-1",
        "segment_id": 3,
        "revision": 2,
        "window_start": 30.0,
        "window_end": 38.4,
        "text": CAPTION.text,
        "is_final": True,
        "audio_seconds": 38.6,
        "adapter": "siren",
        "question_id": "",
        "answer": None,
    }
    assert pb.question_id == "" and pb.answer == captions_pb2.CaptionEvent.YES_NO_UNSPECIFIED
    assert "question_id" not in CAPTION.to_fields()  # captions stay compact in Redis


def test_alerts_reach_every_wire() -> None:
    ev = dataclasses.replace(ALERT, event_id="9-0")
    pb = ev.to_pb().alert
    assert (pb.event_id, pb.alert_id, pb.rule_id, pb.kind, pb.question_id, pb.has_clip) == (
        "9-0",
        ALERT.alert_id,
        "baby",
        "answer_true",
        "cry",
        True,
    )
    assert (pb.window_start_seconds, pb.window_end_seconds) == (10.0, 20.0)
    assert ev.to_json()["type"] == "alert" and ev.to_json()["alert_id"] == ALERT.alert_id


def test_answers_carry_their_question_and_yes_no() -> None:
    pbs = [a.to_pb().caption for a in ANSWERS]
    assert [(p.question_id, p.answer) for p in pbs] == [
        ("baby", captions_pb2.CaptionEvent.YES),
        ("baby", captions_pb2.CaptionEvent.NO),
        ("baby", captions_pb2.CaptionEvent.YES_NO_UNSPECIFIED),
    ]
    assert [(a.to_json()["question_id"], a.to_json()["answer"]) for a in ANSWERS] == [
        ("baby", True),
        ("baby", False),
        ("baby", None),
    ]
    assert final_captions([CAPTION, *ANSWERS]) == final_captions([CAPTION])  # answers are not captions


def test_error_status_codes() -> None:
    assert ERROR.to_pb().error.code == grpc.StatusCode.DATA_LOSS.value[0]  # not fatal, no code
    assert FATAL.to_pb().error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert ErrorEvent("x", "R", fatal=True).to_pb().error.code == grpc.StatusCode.INTERNAL.value[0]
    assert ErrorEvent("x", "R", fatal=True, code="NOT_A_CODE").status() is grpc.StatusCode.INTERNAL
    pb = FATAL.to_pb().error
    assert (pb.message, pb.reason, pb.fatal) == ("gone", "ENCODER_STATE_LOST", True)
    assert FATAL.to_json() == {
        "type": "error",
        "event_id": "",
        "message": "gone",
        "reason": "ENCODER_STATE_LOST",
        "fatal": True,
    }


def test_end_reasons_map_to_the_proto() -> None:
    expect = {
        EndReason.END_OF_STREAM: captions_pb2.SessionEnded.CLIENT_CLOSED,
        EndReason.ERROR: captions_pb2.SessionEnded.ERROR,
        EndReason.IDLE: captions_pb2.SessionEnded.IDLE_TIMEOUT,
    }
    for reason, code in expect.items():
        pb = EndEvent(reason, 3.0).to_pb(last_caption_id="9-0").ended
        assert (pb.reason, pb.total_audio_seconds, pb.last_event_id) == (code, 3.0, "9-0")
    assert END.to_json() == {"type": "ended", "event_id": "", "reason": "idle", "audio_seconds": 12.25}


def test_entries_no_writer_makes_are_clear_errors() -> None:
    with pytest.raises(InvalidArgument, match="unknown type"):
        from_fields("1-0", {"type": "mystery"})
    with pytest.raises(InvalidArgument, match="malformed"):
        from_fields("1-0", {"type": "caption", "segment_id": "x"})
    # An entry without a type is a caption (the oldest writers set none); an unknown end reason is an error end.
    ev = from_fields("1-0", {k: v for k, v in CAPTION.to_fields().items() if k != "type"})
    assert isinstance(ev, CaptionEvent)
    end = from_fields("2-0", {"type": "end", "reason": "meteor"})
    assert isinstance(end, EndEvent) and end.reason is EndReason.ERROR


def test_final_captions_keep_the_last_final_of_each_segment_in_order() -> None:
    def cap(seg: int, text: str, final: bool) -> CaptionEvent:
        return CaptionEvent(seg, 0, seg * 10.0, seg * 10.0 + 10, text, final)

    evs: list[Event] = [
        cap(1, "b", True),
        cap(0, "a0", False),
        cap(0, "a", True),
        ERROR,
        cap(1, "b2", True),
        END,
    ]
    assert [(c.start, c.text) for c in final_captions(evs)] == [(0.0, "a"), (10.0, "b2")]


def test_caption_stream_writes_and_reads_back_through_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        stream = CaptionStream(StreamClient(client), maxlen=10)
        first = stream.append("s1", CAPTION)
        stream.end_with_error("s1", "gone", "FAILED_PRECONDITION", "ENCODER_STATE_LOST", 4.0)
        got = stream.all("s1")
        assert got[0] == _with_id(CAPTION, first)
        assert isinstance(got[1], ErrorEvent) and got[1].fatal and got[1].code == "FAILED_PRECONDITION"
        assert (
            isinstance(got[2], EndEvent) and got[2].reason is EndReason.ERROR and got[2].audio_seconds == 4.0
        )
        assert stream.read("s1", first, block_ms=1) == got[1:]
        assert stream.latest("s1", 2) == got[:0:-1]
        assert stream.has_ended("s1") and not stream.has_ended("s2")
    finally:
        client.close()
