"""Session settings: every translator round-trips, and defaults come from SessionSettings alone."""

from __future__ import annotations

import pytest

from services import constants
from services.errors import InvalidArgument
from services.pb.midasheng.v1 import captions_pb2
from services.wire.settings import (
    SESSION_FIELDS,
    SessionSettings,
    StreamSettings,
    encoding_from_pb,
    session_to_json,
    settings_from_hash,
    settings_from_json,
    settings_from_pb,
    settings_to_hash,
    settings_to_pb,
)

CUSTOM = StreamSettings(
    sample_rate=44_100,
    encoding=constants.FLOAT32,
    channels=2,
    session=SessionSettings(
        window_seconds=6.4,
        hop_seconds=1.2,
        prompt="Is there a siren? 警报?",
        interim_results=False,
        max_new_tokens=17,
        adapter="siren",
        interim_window=constants.SLIDING,
    ),
    language="en",
)


def test_the_fields_are_the_dataclass_fields() -> None:
    assert set(SESSION_FIELDS) == {
        "window_seconds",
        "hop_seconds",
        "prompt",
        "interim_results",
        "max_new_tokens",
        "adapter",
        "interim_window",
    }


@pytest.mark.parametrize("s", [StreamSettings(), CUSTOM], ids=["defaults", "custom"])
def test_redis_hash_round_trip(s: StreamSettings) -> None:
    fields = settings_to_hash(s)
    assert all(isinstance(v, str) for v in fields.values())
    assert settings_from_hash({k.encode(): v.encode() for k, v in fields.items()}) == s


@pytest.mark.parametrize("s", [StreamSettings(), CUSTOM], ids=["defaults", "custom"])
def test_protobuf_round_trip(s: StreamSettings) -> None:
    pb = settings_to_pb(s, session_id="abc", resume_after="3-0")
    assert (pb.session_id, pb.resume_after_event_id) == ("abc", "3-0")
    back = settings_from_pb(captions_pb2.SessionConfig.FromString(pb.SerializeToString()))
    assert back == s


def test_protobuf_zero_values_mean_the_defaults() -> None:
    s = settings_from_pb(captions_pb2.SessionConfig())
    d = SessionSettings()
    assert s.sample_rate == constants.SAMPLE_RATE and s.encoding == constants.LINEAR16 and s.channels == 1
    assert (s.session.window_seconds, s.session.hop_seconds, s.session.prompt, s.session.max_new_tokens) == (
        d.window_seconds,
        d.hop_seconds,
        d.prompt,
        d.max_new_tokens,
    )
    assert s.session.interim_results is False  # a proto3 bool: documented default false
    assert s.session.interim_window == constants.DEFAULT_INTERIM_WINDOW
    with pytest.raises(InvalidArgument, match="unknown audio encoding"):
        encoding_from_pb(99)


def test_json_round_trip_and_defaults() -> None:
    page = settings_from_json(session_to_json(CUSTOM.session))
    assert page.session == CUSTOM.session
    assert (page.sample_rate, page.encoding, page.channels) == (constants.SAMPLE_RATE, constants.FLOAT32, 1)
    assert settings_from_json({}).session == SessionSettings()
    assert settings_from_json(None).session == SessionSettings()
    # Empty strings and whitespace fall back to the defaults; numbers may come as strings.
    s = settings_from_json(
        {"prompt": "  ", "window_seconds": "", "hop_seconds": "1.5", "max_new_tokens": 20.0}
    )
    assert (s.session.prompt, s.session.window_seconds, s.session.hop_seconds, s.session.max_new_tokens) == (
        constants.DEFAULT_PROMPT,
        constants.DEFAULT_WINDOW_SECONDS,
        1.5,
        20,
    )


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"window_seconds": "ten"}, "must be a number"),
        ({"window_seconds": float("nan")}, "finite"),
        ({"max_new_tokens": 2.5}, "whole number"),
        ({"interim_results": "yes"}, "true or false"),
        ({"prompt": 5}, "string"),
        ({"colour": 1}, "unknown config field"),
        ([1], "JSON object"),
    ],
)
def test_json_errors_name_the_field(bad: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        settings_from_json(bad)


def test_hash_errors_are_clear() -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        settings_from_hash({b"window_seconds": b"wide"})
    with pytest.raises(InvalidArgument, match="window_seconds"):
        settings_from_hash({b"window_seconds": b"99"})  # validated
    assert settings_from_hash({}) == StreamSettings()  # a hash with only lifecycle fields


def test_validation() -> None:
    StreamSettings().validate()
    for bad in (
        SessionSettings(window_seconds=0.5),
        SessionSettings(hop_seconds=11.0),
        SessionSettings(max_new_tokens=0),
        SessionSettings(interim_window="diagonal"),
    ):
        with pytest.raises(InvalidArgument):
            StreamSettings(session=bad).validate()
    with pytest.raises(InvalidArgument, match="sample_rate"):
        StreamSettings(sample_rate=4000).validate()
