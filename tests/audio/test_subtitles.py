"""Tests for services.audio.subtitles: segment planning, formatting, rendering and parsing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from services.audio.subtitles import (
    FORMATS,
    TimedCaption,
    format_timestamp,
    parse_srt,
    parse_webvtt,
    plan_segments,
    render,
    to_jsonl,
    to_srt,
    to_text,
    to_webvtt,
)

CAPTIONS = [
    TimedCaption(0.0, 10.0, "A dog barks in the distance."),
    TimedCaption(10.0, 20.5, "Rain falls\non a tin roof,\r\n  then thunder. "),
    TimedCaption(20.5, 3661.5, "Music plays --> a crowd <cheers> & claps"),
]


# --- plan_segments -------------------------------------------------------------------------------


def test_plan_segments_with_remainder() -> None:
    assert plan_segments(95, 30) == [(0, 30), (30, 60), (60, 90), (90, 95)]


def test_plan_segments_merges_short_tail() -> None:
    assert plan_segments(90.5, 30) == [(0, 30), (30, 60), (60, 90.5)]


def test_plan_segments_exact_and_short() -> None:
    assert plan_segments(90, 30) == [(0, 30), (30, 60), (60, 90)]
    assert plan_segments(0.4, 30) == [(0, 0.4)]  # nothing to merge into
    assert plan_segments(30.999, 30) == [(0, 30.999)]
    assert plan_segments(31, 30) == [(0, 30), (30, 31)]  # exactly 1 s is kept
    assert plan_segments(0, 30) == []


@pytest.mark.parametrize(("total", "seg"), [(0.3, 0.1), (7200.7, 30.0), (1000.0, 7.3), (95.0, 2.5)])
def test_plan_segments_covers_exactly(total: float, seg: float) -> None:
    segments = plan_segments(total, seg)
    assert segments[0][0] == 0
    assert segments[-1][1] == total
    for (_, end), (start, _) in zip(segments, segments[1:], strict=False):
        assert end == start  # contiguous, no overlap, no gap
    assert all(end > start for start, end in segments)
    assert all(end - start <= seg + 1.0 for start, end in segments)
    # The tail is a full segment or a remainder of at least 1 s (shorter ones were merged).
    tail_start, tail_end = segments[-1]
    assert tail_end - tail_start >= min(seg, 1.0, total) - 1e-9


@pytest.mark.parametrize(
    ("total", "seg", "message"),
    [
        (-1, 30, "Total duration"),
        (float("nan"), 30, "Total duration"),
        (float("inf"), 30, "Total duration"),
        (60, 0, "Segment length"),
        (60, -5, "Segment length"),
        (60, float("nan"), "Segment length"),
    ],
)
def test_plan_segments_rejects_bad_args(total: float, seg: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_segments(total, seg)


# --- timestamps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0, "00:00:00,000", "00:00:00.000"),
        (3599.9995, "01:00:00,000", "01:00:00.000"),  # rounding carries into the hour
        (3599.9994, "00:59:59,999", "00:59:59.999"),
        (3661.5, "01:01:01,500", "01:01:01.500"),
        (0.0015, "00:00:00,002", "00:00:00.002"),  # half-up, not banker's or float-noise rounding
        (59.9999, "00:01:00,000", "00:01:00.000"),
        (360000.25, "100:00:00,250", "100:00:00.250"),  # hours beyond 99 widen, not wrap
    ],
)
def test_format_timestamp(seconds: float, srt: str, vtt: str) -> None:
    assert format_timestamp(seconds, "srt") == srt
    assert format_timestamp(seconds, "vtt") == vtt


def test_format_timestamp_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="format"):
        format_timestamp(1.0, "ass")
    with pytest.raises(ValueError, match=">= 0"):
        format_timestamp(-0.5, "srt")
    with pytest.raises(ValueError, match="finite"):
        format_timestamp(float("nan"), "vtt")


# --- TimedCaption --------------------------------------------------------------------------------


def test_timed_caption_is_frozen_and_validated() -> None:
    caption = TimedCaption(1.0, 2.0, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        caption.text = "y"  # type: ignore[misc]
    with pytest.raises(ValueError, match="before its start"):
        TimedCaption(2.0, 1.0, "x")
    with pytest.raises(ValueError, match="negative"):
        TimedCaption(-1.0, 1.0, "x")


# --- renderers -----------------------------------------------------------------------------------


def test_to_srt_exact_output() -> None:
    assert to_srt(CAPTIONS[:2]) == (
        "1\n00:00:00,000 --> 00:00:10,000\nA dog barks in the distance.\n"
        "\n"
        "2\n00:00:10,000 --> 00:00:20,500\nRain falls on a tin roof, then thunder.\n"
    )


def test_to_webvtt_header_and_escaping() -> None:
    out = to_webvtt(CAPTIONS)
    assert out.startswith("WEBVTT\n\n")
    assert "00:00:20.500 --> 01:01:01.500\nMusic plays --&gt; a crowd &lt;cheers&gt; &amp; claps\n" in out
    # Only timing lines may contain the arrow.
    assert [line for line in out.splitlines() if "-->" in line] == [
        "00:00:00.000 --> 00:00:10.000",
        "00:00:10.000 --> 00:00:20.500",
        "00:00:20.500 --> 01:01:01.500",
    ]
    assert to_webvtt([]) == "WEBVTT\n\n"


def test_srt_round_trip() -> None:
    parsed = parse_srt(to_srt(CAPTIONS))
    assert [(c.start, c.end) for c in parsed] == [(c.start, c.end) for c in CAPTIONS]
    assert [c.text for c in parsed] == [
        "A dog barks in the distance.",
        "Rain falls on a tin roof, then thunder.",
        "Music plays --> a crowd <cheers> & claps",
    ]


def test_webvtt_round_trip() -> None:
    parsed = parse_webvtt(to_webvtt(CAPTIONS))
    assert parsed == [
        TimedCaption(0.0, 10.0, "A dog barks in the distance."),
        TimedCaption(10.0, 20.5, "Rain falls on a tin roof, then thunder."),
        TimedCaption(20.5, 3661.5, "Music plays --> a crowd <cheers> & claps"),
    ]


def test_round_trip_rounds_to_milliseconds() -> None:
    captions = [TimedCaption(0.12345, 1.9996, "x")]
    assert parse_srt(to_srt(captions)) == [TimedCaption(0.123, 2.0, "x")]
    assert parse_webvtt(to_webvtt(captions)) == [TimedCaption(0.123, 2.0, "x")]


def test_empty_text_captions_are_skipped_in_subtitles() -> None:
    captions = [TimedCaption(0, 1, "a"), TimedCaption(1, 2, " \n "), TimedCaption(2, 3, "b")]
    parsed = parse_srt(to_srt(captions))
    assert [(c.start, c.text) for c in parsed] == [(0, "a"), (2, "b")]
    assert [c.text for c in parse_webvtt(to_webvtt(captions))] == ["a", "b"]


def test_to_jsonl() -> None:
    out = to_jsonl(CAPTIONS, model="midashenglm", source="mic")
    lines = out.splitlines()
    assert out.endswith("\n") and len(lines) == 3
    rows = [json.loads(line) for line in lines]
    assert rows[0] == {
        "start": 0.0,
        "end": 10.0,
        "text": "A dog barks in the distance.",
        "model": "midashenglm",
        "source": "mic",
    }
    assert rows[1]["text"] == CAPTIONS[1].text  # JSON keeps text verbatim
    assert rows[2]["end"] == 3661.5
    assert to_jsonl([]) == ""
    with pytest.raises(ValueError, match="text"):
        to_jsonl(CAPTIONS, text="override")


def test_to_text() -> None:
    assert to_text(CAPTIONS[:2]) == (
        "[00:00:00.000 --> 00:00:10.000] A dog barks in the distance.\n"
        "[00:00:10.000 --> 00:00:20.500] Rain falls on a tin roof, then thunder.\n"
    )


def test_render_dispatch() -> None:
    assert FORMATS == ("text", "jsonl", "srt", "vtt")
    assert render(CAPTIONS, "text") == to_text(CAPTIONS)
    assert render(CAPTIONS, "jsonl") == to_jsonl(CAPTIONS)
    assert render(CAPTIONS, "srt") == to_srt(CAPTIONS)
    assert render(iter(CAPTIONS), "vtt") == to_webvtt(CAPTIONS)
    with pytest.raises(ValueError, match="Unknown caption format"):
        render(CAPTIONS, "ass")
    with pytest.raises(ValueError, match="Unknown caption format"):
        render(CAPTIONS, "TimedCaption")


# --- parsers -------------------------------------------------------------------------------------


def test_parse_srt_tolerates_bom_crlf_and_multiline() -> None:
    text = "\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\nline one\r\nline two\r\n\r\n\r\n"
    assert parse_srt(text) == [TimedCaption(1.0, 2.5, "line one\nline two")]
    assert parse_srt("") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\n00:00:01,000 --> 00:00:02,000\n", "needs an index"),
        ("2\n00:00:01,000 --> 00:00:02,000\nhi\n", "expected 1"),
        ("1\n00:00:01.000 --> 00:00:02,000\nhi\n", "malformed timing"),
        ("1\n00:00:01,000 -> 00:00:02,000\nhi\n", "malformed timing"),
        ("1\n00:61:01,000 --> 00:62:02,000\nhi\n", "malformed timing"),
        ("1\n00:00:01,000 --> 00:00:02,000\nhi\n\nnot a block\n", "block 2"),
    ],
)
def test_parse_srt_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_srt(text)


def test_parse_webvtt_features() -> None:
    text = (
        "WEBVTT - captions\nKind: captions\n\n"
        "NOTE this is a comment\nspanning lines\n\n"
        "cue-1\n00:01.000 --> 00:02.000 align:start position:10%\nshort &amp;lt; form\n\n"
        "01:00:00.000 --> 01:00:01.250\ntwo\nlines\n"
    )
    assert parse_webvtt(text) == [
        TimedCaption(1.0, 2.0, "short &lt; form"),
        TimedCaption(3600.0, 3601.25, "two\nlines"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "WEBVTT"),
        ("WEBVTTX\n\n00:00.000 --> 00:01.000\nhi\n", "WEBVTT"),
        ("WEBVTT\n\n00:00,000 --> 00:01,000\nhi\n", "malformed timing"),
        ("WEBVTT\n\nid-only\n", "no timing line"),
        ("WEBVTT\n\n00:00.000 --> 00:01.000\n", "no cue text"),
        ("WEBVTT\n\n00:00.000 --> 00:01.000\nbad --> arrow\n", "'-->' in its cue text"),
    ],
)
def test_parse_webvtt_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_webvtt(text)
