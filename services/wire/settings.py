"""Session settings: one dataclass, one translator per wire.

A live session's settings travel three ways: the gRPC ``SessionConfig`` (public API), the page's
JSON offer (``POST /api/webrtc/offer``) and the Redis config hash (gateway -> LM workers, and a
gateway resuming a session). Every default lives in :class:`SessionSettings` (from
:mod:`services.constants`); the translators below only map names and types.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from services import constants
from services.audio.pcm import validate_format
from services.errors import InvalidArgument
from services.pb.midasheng.v1 import captions_pb2
from services.wire.limits import SPECIAL_TOKEN, check_adapter_name, check_prompt

QUESTION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Question:
    """A question answered about every window of a live stream (``question_id`` on its answers)."""

    id: str
    text: str

    def validate(self) -> None:
        if not QUESTION_ID.match(self.id):
            raise InvalidArgument(
                f"question ids are 1 to 64 letters, digits, '.', '_' or '-', got {self.id!r}"
            )
        if not self.text.strip():
            raise InvalidArgument(f"question {self.id!r} has no text")
        check_prompt(self.text, constants.MAX_QUESTION_CHARS, f"question {self.id!r}")


def check_questions(questions: Sequence[Question]) -> None:
    if len(questions) > constants.MAX_QUESTIONS:
        raise InvalidArgument(
            f"at most {constants.MAX_QUESTIONS} questions per session, got {len(questions)}"
        )
    for q in questions:
        q.validate()
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("question ids must be unique within the session")


def questions_from_pb(items: Sequence[captions_pb2.Question]) -> tuple[Question, ...]:
    out = tuple(Question(q.id, q.text.strip()) for q in items)
    check_questions(out)
    return out


def questions_to_pb(questions: Sequence[Question]) -> list[captions_pb2.Question]:
    return [captions_pb2.Question(id=q.id, text=q.text) for q in questions]


def questions_from_json(value: object) -> tuple[Question, ...]:
    """``[{"id": ..., "text": ...}, ...]`` (the page, the HTTP API, the config hash) -> questions."""
    if value is None or value == "":
        return ()
    if not isinstance(value, list) or not all(
        isinstance(q, dict)
        and set(q) <= {"id", "text"}
        and isinstance(q.get("id"), str)
        and isinstance(q.get("text"), str)
        for q in value
    ):
        raise InvalidArgument('questions must be a list of {"id": "...", "text": "..."} objects')
    out = tuple(Question(q["id"], q["text"].strip()) for q in value)
    check_questions(out)
    return out


def questions_to_json(questions: Sequence[Question]) -> list[dict[str, str]]:
    return [{"id": q.id, "text": q.text} for q in questions]


@dataclass(frozen=True)
class SessionSettings:
    """What a live session captions and how often (the caption part of its settings)."""

    window_seconds: float = constants.DEFAULT_WINDOW_SECONDS
    hop_seconds: float = constants.DEFAULT_HOP_SECONDS
    prompt: str = constants.DEFAULT_PROMPT
    interim_results: bool = True
    max_new_tokens: int = constants.DEFAULT_MAX_NEW_TOKENS
    adapter: str = ""  # "" = the base model
    interim_window: str = constants.DEFAULT_INTERIM_WINDOW  # what an interim describes (INTERIM_WINDOWS)
    questions: tuple[Question, ...] = ()  # answered beside every caption

    def validate(self) -> None:
        if not 1.0 <= self.window_seconds <= 30.0:
            raise InvalidArgument(f"window_seconds must be within [1, 30], got {self.window_seconds}.")
        if not 0.2 <= self.hop_seconds <= self.window_seconds:
            raise InvalidArgument(f"hop_seconds must be within [0.2, window], got {self.hop_seconds}.")
        if not 1 <= self.max_new_tokens <= 256:
            raise InvalidArgument(f"max_new_tokens must be within [1, 256], got {self.max_new_tokens}.")
        if self.interim_window not in constants.INTERIM_WINDOWS:
            raise InvalidArgument(
                f"interim_window must be one of {', '.join(constants.INTERIM_WINDOWS)}, got {self.interim_window!r}."
            )
        m = SPECIAL_TOKEN.search(self.prompt)
        if m:
            raise InvalidArgument(
                f"prompt may not contain the model's special tokens (found {m.group(0)!r})."
            )
        check_adapter_name(self.adapter)
        check_questions(self.questions)

    @property
    def window_tokens(self) -> int:
        """The caption window in 5 Hz audio tokens."""
        return max(1, round(self.window_seconds * constants.TOKENS_PER_SECOND))


@dataclass(frozen=True)
class StreamSettings:
    """A live session's settings: the audio format the client sends, plus its caption settings."""

    sample_rate: int = constants.SAMPLE_RATE  # Hz
    encoding: str = constants.LINEAR16
    channels: int = 1
    session: SessionSettings = field(default_factory=SessionSettings)
    language: str = ""  # BCP-47 hint, "" = the model's choice

    def validate(self) -> None:
        validate_format(self.sample_rate, self.encoding, self.channels)
        if len(self.language) > constants.MAX_LANGUAGE_CHARS or not self.language.isprintable():
            raise InvalidArgument(
                f"language must be a BCP-47 tag of at most {constants.MAX_LANGUAGE_CHARS} printable characters."
            )
        self.session.validate()


# The caption fields and the Python type each carries on every wire (questions, a list of
# messages, has translators of its own).
SESSION_FIELDS: dict[str, type] = {
    f.name: type(getattr(SessionSettings(), f.name)) for f in fields(SessionSettings) if f.name != "questions"
}

# --- protobuf (captions.proto SessionConfig) -----------------------------------------------------

_PB_ENCODINGS: dict[int, str] = {
    captions_pb2.AUDIO_ENCODING_UNSPECIFIED: constants.LINEAR16,
    captions_pb2.LINEAR16: constants.LINEAR16,
    captions_pb2.FLOAT32: constants.FLOAT32,
}


_PB_INTERIM: dict[int, str] = {
    captions_pb2.INTERIM_WINDOW_UNSPECIFIED: constants.DEFAULT_INTERIM_WINDOW,
    captions_pb2.SEGMENT: constants.SEGMENT,
    captions_pb2.SLIDING: constants.SLIDING,
}
_PB_MAPPED = ("interim_results", "interim_window")  # fields that need more than a copy


def encoding_from_pb(value: int) -> str:
    """A ``captions.proto`` AudioEncoding -> its name (unspecified = LINEAR16)."""
    name = _PB_ENCODINGS.get(value)
    if name is None:
        raise InvalidArgument(f"unknown audio encoding {value}")
    return name


def settings_from_pb(cfg: captions_pb2.SessionConfig) -> StreamSettings:
    """A client's SessionConfig -> settings; proto3 zero values mean "the default"."""
    base = StreamSettings()
    session = replace(
        base.session,
        **{
            name: value for name in SESSION_FIELDS if name not in _PB_MAPPED and (value := getattr(cfg, name))
        },
        interim_results=cfg.interim_results,  # a proto3 bool: false unless sent (captions.proto)
        interim_window=_PB_INTERIM.get(cfg.interim_window, "?"),  # an unknown value fails validation
        questions=questions_from_pb(cfg.questions),
    )
    return StreamSettings(
        sample_rate=cfg.sample_rate_hz or base.sample_rate,
        encoding=encoding_from_pb(cfg.encoding),
        channels=cfg.channels or base.channels,
        session=session,
        language=cfg.language,
    )


def settings_to_pb(
    s: StreamSettings, session_id: str = "", resume_after: str = ""
) -> captions_pb2.SessionConfig:
    """Settings -> SessionConfig with every field explicit (SessionStarted.effective_config)."""
    return captions_pb2.SessionConfig(
        sample_rate_hz=s.sample_rate,
        encoding=captions_pb2.AudioEncoding.Value(s.encoding),
        channels=s.channels,
        language=s.language,
        session_id=session_id,
        resume_after_event_id=resume_after,
        interim_results=s.session.interim_results,
        interim_window=captions_pb2.InterimWindow.Value(s.session.interim_window.upper()),
        questions=questions_to_pb(s.session.questions),
        **{name: getattr(s.session, name) for name in SESSION_FIELDS if name not in _PB_MAPPED},
    )


# --- JSON (the page's offer; GET /api/config) ----------------------------------------------------


def _json_value(name: str, kind: type, value: object, default: Any) -> Any:
    if value is None or (kind is not str and value == ""):
        return default
    if kind is bool:
        if not isinstance(value, bool):
            raise InvalidArgument(f"config.{name} must be true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise InvalidArgument(f"config.{name} must be a string")
        return value.strip() or default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidArgument(f"config.{name} must be a number")
    try:
        x = float(value)
    except ValueError as e:
        raise InvalidArgument(f"config.{name} must be a number, got {value!r}") from e
    if not math.isfinite(x):
        raise InvalidArgument(f"config.{name} must be a finite number")
    if kind is int:
        if x != int(x):
            raise InvalidArgument(f"config.{name} must be a whole number")
        return int(x)
    return x


def settings_from_json(cfg: object) -> StreamSettings:
    """The offer's ``config`` object -> settings for the page's 16 kHz mono float32 audio."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise InvalidArgument("config must be a JSON object")
    unknown = set(cfg) - set(SESSION_FIELDS) - {"questions"}
    if unknown:
        raise InvalidArgument(f"unknown config field(s): {', '.join(sorted(unknown))}")
    base = SessionSettings()
    values = {
        name: _json_value(name, kind, cfg.get(name), getattr(base, name))
        for name, kind in SESSION_FIELDS.items()
    }
    questions = questions_from_json(cfg.get("questions"))
    return StreamSettings(encoding=constants.FLOAT32, session=SessionSettings(**values, questions=questions))


def session_to_json(s: SessionSettings) -> dict[str, Any]:
    return {
        **{name: getattr(s, name) for name in SESSION_FIELDS},
        "questions": questions_to_json(s.questions),
    }


# --- Redis config hash (gateway -> LM workers; resume) -------------------------------------------

_FORMAT_FIELDS = ("sample_rate", "encoding", "channels", "language")


def _to_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


def _from_text(kind: type, text: str) -> Any:
    if kind is bool:
        return text == "1"
    if kind is int:
        return int(float(text))
    return kind(text)


QUESTIONS_FIELD = "questions"  # config hash field: the questions as JSON (changed live by the gateway)


def questions_to_text(questions: Sequence[Question]) -> str:
    return json.dumps(questions_to_json(questions), separators=(",", ":"), ensure_ascii=False)


def questions_from_text(text: str | bytes | None) -> tuple[Question, ...]:
    """The config hash's questions field -> questions (InvalidArgument when malformed)."""
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"the session's questions are not JSON: {e}") from e
    return questions_from_json(value)


def settings_to_hash(s: StreamSettings) -> dict[str, str]:
    out = {name: _to_text(getattr(s.session, name)) for name in SESSION_FIELDS}
    out[QUESTIONS_FIELD] = questions_to_text(s.session.questions)
    out.update({name: _to_text(getattr(s, name)) for name in _FORMAT_FIELDS})
    return out


def settings_from_hash(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> StreamSettings:
    """The config hash -> validated settings; a field missing from the hash takes its default."""
    get = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    base = StreamSettings()
    try:
        session = SessionSettings(
            **{
                name: _from_text(kind, get[name]) if get.get(name) else getattr(base.session, name)
                for name, kind in SESSION_FIELDS.items()
            },
            questions=questions_from_text(get.get(QUESTIONS_FIELD)),
        )
        s = StreamSettings(
            **{
                name: _from_text(type(getattr(base, name)), get[name])
                if get.get(name)
                else getattr(base, name)
                for name in _FORMAT_FIELDS
            },
            session=session,
        )
    except ValueError as e:
        raise InvalidArgument(f"the session's config hash holds a malformed value: {e}") from e
    s.validate()
    return s
