"""Timestamped caption output: segment planning, SRT/WebVTT/JSONL/text rendering and parsing.

The parsers are deliberately small and strict: they exist so tests (and callers
that want to double-check) can validate what the renderers produce.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

MIN_TAIL_SECONDS = 1.0
"""A final remainder shorter than this is merged into the previous segment."""

# Tolerance for float boundary arithmetic (e.g. 0.3 / 0.1 == 2.9999999999999996).
_EPSILON = 1e-9

TIMESTAMP_FORMATS = ("srt", "vtt")
FORMATS = ("text", "jsonl", "srt", "vtt")


@dataclass(frozen=True)
class TimedCaption:
    """One caption spanning [start, end] seconds of audio."""

    start: float
    end: float
    text: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"Caption times must be finite numbers, got {self.start} and {self.end}.")
        if self.start < 0:
            raise ValueError(f"Caption start must not be negative, got {self.start}.")
        if self.end < self.start:
            raise ValueError(f"Caption end ({self.end}) must not be before its start ({self.start}).")


def plan_segments(total_seconds: float, segment_seconds: float) -> list[tuple[float, float]]:
    """Split [0, total_seconds] into consecutive segments of ``segment_seconds``.

    The segments cover the range exactly; a final remainder shorter than
    :data:`MIN_TAIL_SECONDS` is merged into the previous segment.
    """
    if not math.isfinite(total_seconds) or total_seconds < 0:
        raise ValueError(f"Total duration must be a finite number of seconds >= 0, got {total_seconds}.")
    if not math.isfinite(segment_seconds) or segment_seconds <= 0:
        raise ValueError(f"Segment length must be a finite number of seconds > 0, got {segment_seconds}.")
    if total_seconds == 0:
        return []

    full = math.floor(total_seconds / segment_seconds + _EPSILON)
    # Multiply rather than accumulate so boundaries do not drift over long recordings.
    edges = [i * segment_seconds for i in range(full + 1)]
    if total_seconds - edges[-1] > _EPSILON:
        edges.append(total_seconds)
        if len(edges) > 2 and total_seconds - edges[-2] < MIN_TAIL_SECONDS:
            del edges[-2]
    else:
        edges[-1] = total_seconds  # snap away float noise so the last end is exactly total
    return list(zip(edges[:-1], edges[1:], strict=True))


def format_timestamp(seconds: float, fmt: str) -> str:
    """Format seconds as ``HH:MM:SS,mmm`` (fmt="srt") or ``HH:MM:SS.mmm`` (fmt="vtt")."""
    if fmt not in TIMESTAMP_FORMATS:
        raise ValueError(f"Unknown timestamp format {fmt!r}; expected one of {', '.join(TIMESTAMP_FORMATS)}.")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"Timestamp must be a finite number of seconds >= 0, got {seconds}.")
    # Round half-up on the decimal repr so 3599.9995 becomes 01:00:00.000 rather than
    # depending on the binary float happening to sit just below or above the half.
    total_ms = int(Decimal(repr(float(seconds))).scaleb(3).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    sep = "," if fmt == "srt" else "."
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def _one_line(text: str) -> str:
    """Strip and collapse whitespace runs (newlines included) to single spaces."""
    # A blank line ends a cue in SRT and WebVTT, so caption text must stay on one line.
    return " ".join(text.split())


def _escape_vtt(text: str) -> str:
    """Escape characters WebVTT cue text may not contain literally (covers ``-->``)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _unescape_vtt(text: str) -> str:
    """Inverse of :func:`_escape_vtt`; ``&amp;`` goes last so ``&amp;lt;`` stays ``&lt;``."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _cues(captions: Iterable[TimedCaption]) -> list[tuple[TimedCaption, str]]:
    """Captions with their one-line text; empty ones are dropped since an empty cue is malformed."""
    return [(c, line) for c in captions if (line := _one_line(c.text))]


def to_srt(captions: Iterable[TimedCaption]) -> str:
    """Render captions as SubRip (.srt); captions with empty text are skipped."""
    blocks = [
        f"{i}\n{format_timestamp(c.start, 'srt')} --> {format_timestamp(c.end, 'srt')}\n{line}\n"
        for i, (c, line) in enumerate(_cues(captions), start=1)
    ]
    return "\n".join(blocks)


def to_webvtt(captions: Iterable[TimedCaption]) -> str:
    """Render captions as WebVTT (.vtt); captions with empty text are skipped."""
    blocks = [
        f"{format_timestamp(c.start, 'vtt')} --> {format_timestamp(c.end, 'vtt')}\n{_escape_vtt(line)}\n"
        for c, line in _cues(captions)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_jsonl(captions: Iterable[TimedCaption], **extra: Any) -> str:
    """Render one JSON object per line with start, end, text and any ``extra`` fields."""
    clash = {"start", "end", "text"} & extra.keys()
    if clash:
        raise ValueError(f"Extra fields must not override caption fields: {', '.join(sorted(clash))}.")
    lines = [
        json.dumps(
            # Millisecond precision like the other formats; text is kept verbatim since JSON escapes it.
            {"start": round(c.start, 3), "end": round(c.end, 3), "text": c.text, **extra},
            ensure_ascii=False,
        )
        + "\n"
        for c in captions
    ]
    return "".join(lines)


def to_text(captions: Iterable[TimedCaption]) -> str:
    """Render ``[HH:MM:SS.mmm --> HH:MM:SS.mmm] text`` lines, one per caption."""
    return "".join(
        f"[{format_timestamp(c.start, 'vtt')} --> {format_timestamp(c.end, 'vtt')}] {_one_line(c.text)}\n"
        for c in captions
    )


_RENDERERS: dict[str, Callable[[Sequence[TimedCaption]], str]] = {
    "text": to_text,
    "jsonl": to_jsonl,
    "srt": to_srt,
    "vtt": to_webvtt,
}


def render(captions: Iterable[TimedCaption], fmt: str) -> str:
    """Render captions in one of :data:`FORMATS`."""
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise ValueError(f"Unknown caption format {fmt!r}; expected one of {', '.join(FORMATS)}.")
    return renderer(list(captions))


_SRT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d),(\d{3})"
_SRT_TIMING = re.compile(rf"^{_SRT_TIME} --> {_SRT_TIME}$")
# WebVTT allows the hours field to be omitted and cue settings after the end time.
_VTT_TIME = r"(?:(\d{2,}):)?([0-5]\d):([0-5]\d)\.(\d{3})"
_VTT_TIMING = re.compile(rf"^{_VTT_TIME}[ \t]+-->[ \t]+{_VTT_TIME}(?:[ \t]+.*)?$")


def _seconds(hours: str | None, minutes: str, secs: str, millis: str) -> float:
    """Exact seconds from timestamp fields (integer ms first, to avoid float drift)."""
    total_ms = ((int(hours or 0) * 60 + int(minutes)) * 60 + int(secs)) * 1000 + int(millis)
    return total_ms / 1000


def _blocks(text: str) -> list[list[str]]:
    """Split text into blank-line separated blocks of lines (BOM and CRLF tolerated)."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def parse_srt(text: str) -> list[TimedCaption]:
    """Parse SubRip text strictly; raise ValueError naming the first malformed cue block."""
    captions: list[TimedCaption] = []
    for number, block in enumerate(_blocks(text), start=1):
        if len(block) < 3:
            raise ValueError(f"SRT cue block {number} needs an index, a timing line and text.")
        if block[0].strip() != str(number):
            raise ValueError(f"SRT cue block {number} has index {block[0].strip()!r}, expected {number}.")
        timing = _SRT_TIMING.match(block[1].strip())
        if timing is None:
            raise ValueError(f"SRT cue block {number} has a malformed timing line: {block[1]!r}.")
        g = timing.groups()
        captions.append(TimedCaption(_seconds(*g[:4]), _seconds(*g[4:]), "\n".join(block[2:])))
    return captions


def parse_webvtt(text: str) -> list[TimedCaption]:
    """Parse WebVTT text strictly; NOTE/STYLE/REGION blocks are skipped, entities unescaped."""
    blocks = _blocks(text)
    if not blocks or not re.fullmatch(r"WEBVTT(?:[ \t].*)?", blocks[0][0]):
        raise ValueError("WebVTT text must start with a 'WEBVTT' line.")
    captions: list[TimedCaption] = []
    # The first block is the header (WEBVTT line plus optional metadata lines).
    for number, block in enumerate(blocks[1:], start=1):
        if block[0].split(maxsplit=1)[0] in ("NOTE", "STYLE", "REGION") and "-->" not in block[0]:
            continue
        # An optional cue identifier line precedes the timing line.
        timing_index = 0 if "-->" in block[0] else 1
        if timing_index >= len(block):
            raise ValueError(f"WebVTT block {number} has no timing line.")
        timing = _VTT_TIMING.match(block[timing_index].strip())
        if timing is None:
            raise ValueError(f"WebVTT block {number} has a malformed timing line: {block[timing_index]!r}.")
        lines = block[timing_index + 1 :]
        if not lines:
            raise ValueError(f"WebVTT block {number} has no cue text.")
        if any("-->" in line for line in lines):
            raise ValueError(f"WebVTT block {number} has '-->' in its cue text.")
        g = timing.groups()
        captions.append(TimedCaption(_seconds(*g[:4]), _seconds(*g[4:]), _unescape_vtt("\n".join(lines))))
    return captions
