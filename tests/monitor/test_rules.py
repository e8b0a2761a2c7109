"""Rules: validation, JSON, and the per-stream state machine in stream time."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from services.errors import InvalidArgument
from services.monitor.rules import NO_AUDIO, Alert, Observation, Rule, StreamRules, new_alert_id
from services.wire.events import CaptionEvent


class Feed:
    """Observations of one stream with increasing event ids (Redis stream ids)."""

    def __init__(self, *rules: Rule) -> None:
        self.rules = StreamRules("cam-1", "acme", rules, wall_clock=lambda: 1_700_000_000.0)
        self.ids = itertools.count(1)
        self.alerts: list[Alert] = []

    def say(
        self,
        t: float,
        text: str,
        final: bool = False,
        seg: int = 0,
        question: str = "",
        answer: bool | None = None,
    ) -> list[Alert]:
        obs = Observation(f"{next(self.ids)}-0", text, final, max(0.0, t - 10), t, seg, question, answer)
        out = self.rules.observe(obs)
        self.alerts += out
        return out

    def level(self, t: float, dbfs: float) -> list[Alert]:
        out = self.rules.observe_level(t, dbfs)
        self.alerts += out
        return out


def test_match_fires_once_per_onset_after_debounce_and_respects_cooldown() -> None:
    f = Feed(Rule("alarm", "match", pattern="alarm", debounce_seconds=1.0, cooldown_seconds=10.0))
    # True for 0.5 s only: nothing.
    assert f.say(1.0, "An alarm rings.") == [] and f.say(1.5, "An alarm rings.") == []
    assert f.say(2.0, "Quiet room.") == []
    # True for 2 s: one alert, once the condition has held 1 s.
    assert f.say(3.0, "Alarm!") == [] and f.say(3.5, "alarm") == []
    [alert] = f.say(4.0, "An ALARM beeps.")
    assert (alert.rule_id, alert.kind, alert.tenant, alert.stream) == ("alarm", "match", "acme", "cam-1")
    assert (alert.text, alert.window_start, alert.window_end) == ("An ALARM beeps.", 0.0, 4.0)
    assert alert.event_id == "6-0" and alert.question_id == "" and alert.wall_time == 1_700_000_000.0
    # Stays true: no more.
    assert f.say(4.5, "alarm") == [] and f.say(5.0, "alarm") == []
    # False, then a new onset within the cooldown (until 14 s): none.
    assert f.say(6.0, "silence") == []
    assert f.say(7.0, "alarm") == [] and f.say(8.5, "alarm") == [] and f.say(9.0, "birds") == []
    # A new onset after the cooldown: one more.
    assert f.say(15.0, "alarm") == []
    [again] = f.say(16.0, "alarm")
    assert again.window_end == 16.0 and again.alert_id != alert.alert_id
    assert len(f.alerts) == 2


def test_an_onset_held_through_the_cooldown_fires_when_the_cooldown_ends() -> None:
    f = Feed(Rule("alarm", "match", pattern="alarm", cooldown_seconds=10.0))
    assert len(f.say(1.0, "alarm")) == 1  # debounce 0: the first observation fires
    assert f.say(2.0, "no") == []
    assert [f.say(t, "alarm") for t in (3.0, 6.0, 10.0)] == [[], [], []]
    [late] = f.say(11.0, "alarm")
    assert late.window_end == 11.0
    assert f.say(12.0, "alarm") == []


def test_answer_true_with_boolean_answers() -> None:
    f = Feed(Rule("baby", "answer_true", source="q-baby", debounce_seconds=1.0, cooldown_seconds=5.0))

    def ask(t: float, answer: bool) -> list[Alert]:
        return f.say(t, "Yes." if answer else "No.", question="q-baby", answer=answer)

    assert ask(1.0, True) == [] and ask(1.5, True) == []
    assert ask(2.0, False) == []
    assert ask(3.0, True) == []
    # An ambiguous answer neither holds nor breaks the condition.
    assert f.say(3.5, "Hard to say.", question="q-baby", answer=None) == []
    # Captions and other questions do not count.
    assert f.say(3.8, "Yes", answer=True) == [] and f.say(3.9, "Yes", question="q-other", answer=True) == []
    [alert] = ask(4.0, True)
    assert (alert.kind, alert.question_id, alert.text, alert.window_end) == (
        "answer_true",
        "q-baby",
        "Yes.",
        4.0,
    )
    assert ask(5.0, True) == []
    assert (
        ask(6.0, False) == [] and ask(7.0, True) == [] and ask(8.0, True) == []
    )  # within the cooldown (to 9 s)
    assert ask(8.5, False) == [] and ask(10.0, True) == []
    assert len(ask(11.0, True)) == 1
    assert len(f.alerts) == 2


def test_match_regex_counts_interims_unless_finals_only() -> None:
    fast = Rule("bark", "match", pattern=r"\bdogs?\s+bark", regex=True, cooldown_seconds=0.0)
    final = Rule(
        "bark-final", "match", pattern=r"\bdogs?\s+bark", regex=True, finals_only=True, cooldown_seconds=0.0
    )
    f = Feed(fast, final)
    assert [a.rule_id for a in f.say(2.0, "A DOG barks in the distance.")] == ["bark"]
    assert f.say(4.0, "Dogs bark.") == []
    assert f.say(6.0, "Rain.") == []  # interim: resets "bark", not "bark-final"
    assert [a.rule_id for a in f.say(10.0, "Two dogs bark loudly.", final=True, seg=0)] == [
        "bark",
        "bark-final",
    ]
    assert f.say(12.0, "A hotdog barkeep.") == []


def test_keywords_match_where_a_word_starts() -> None:
    dog = Rule("dog", "match", pattern="dog")
    assert dog.matches("Dogs barking") and dog.matches("a dog.") and not dog.matches("a hotdog stand")
    assert Rule("baby", "match", pattern="婴儿").matches("有婴儿在哭")
    assert Rule("phrase", "match", pattern="glass break").matches("Glass breaking nearby")
    assert not Rule("literal", "match", pattern="a.b").matches("axb")


def test_changed_compares_each_final_with_the_previous_segment() -> None:
    f = Feed(Rule("scene", "changed", cooldown_seconds=0.0))
    assert f.say(10.0, "A beep.", final=True, seg=0) == []  # the first final does not fire
    assert f.say(12.0, "Music plays.") == []  # interims do not count
    assert f.say(20.0, "a BEEP", final=True, seg=1) == []  # the same once normalised
    [alert] = f.say(30.0, "A dog barks.", final=True, seg=2)
    assert (alert.kind, alert.text, alert.window_start, alert.window_end) == (
        "changed",
        "a BEEP -> A dog barks.",
        20.0,
        30.0,
    )
    assert f.say(30.0, "Something else.", final=True, seg=2) == []  # another final of the same segment
    assert len(f.say(40.0, "Rain.", final=True, seg=3)) == 1


def test_changed_respects_the_cooldown() -> None:
    f = Feed(Rule("scene", "changed", cooldown_seconds=15.0))
    f.say(10.0, "A", final=True, seg=0)
    assert len(f.say(20.0, "B", final=True, seg=1)) == 1
    assert f.say(30.0, "C", final=True, seg=2) == []
    assert len(f.say(40.0, "D", final=True, seg=3)) == 1


def test_silence_from_levels_and_from_no_audio() -> None:
    f = Feed(Rule("quiet", "silence", silence_seconds=3.0, silence_dbfs=-50.0, cooldown_seconds=0.0))
    assert f.level(1.0, -20.0) == []
    assert f.level(2.0, -60.0) == [] and f.level(3.0, -70.0) == []  # quiet since 1 s (the span start)
    [alert] = f.level(4.0, -65.0)
    assert (alert.kind, alert.window_start, alert.window_end, alert.event_id) == ("silence", 1.0, 4.0, "")
    assert alert.text == "silence below -50 dBFS for 3.0 s"
    assert f.level(5.0, -60.0) == []
    assert f.level(3.0, -20.0) == []  # not after the last level: ignored
    assert f.level(6.0, -10.0) == []
    # No audio at all: the caller advances stream time with NO_AUDIO.
    assert f.level(7.0, NO_AUDIO) == [] and f.level(8.5, NO_AUDIO) == []
    [gap] = f.level(9.0, NO_AUDIO)
    assert gap.text == "no audio for 3.0 s" and (gap.window_start, gap.window_end) == (6.0, 9.0)
    assert len(f.alerts) == 2


def test_silence_starts_at_start_time() -> None:
    rules = StreamRules("s", "", [Rule("quiet", "silence", silence_seconds=2.0)], start_time=100.0)
    assert rules.observe_level(101.0, NO_AUDIO) == []
    [alert] = rules.observe_level(102.0, NO_AUDIO)
    assert (alert.window_start, alert.tenant) == (100.0, "")


def test_replayed_events_are_ignored() -> None:
    rules = StreamRules("s", "t", [Rule("a", "match", pattern="alarm", cooldown_seconds=0.0)])
    fire = Observation("5-0", "alarm", False, 0.0, 5.0)
    assert len(rules.observe(fire)) == 1
    assert rules.observe(Observation("6-0", "quiet", False, 0.0, 6.0)) == []
    assert rules.observe(fire) == []  # a resumed stream replaying 5-0
    assert len(rules.observe(Observation("7-0", "alarm", False, 0.0, 7.0))) == 1


def test_replace_rules_keeps_the_state_of_unchanged_rules() -> None:
    keep = Rule("keep", "match", pattern="alarm", debounce_seconds=2.0)
    edit = Rule("edit", "match", pattern="alarm", debounce_seconds=2.0)
    rules = StreamRules("cam-1", "t", [keep, edit])
    rules.observe(Observation("1-0", "alarm", False, 0.0, 1.0))
    rules.replace_rules(
        [
            keep,
            Rule("edit", "match", pattern="ALARM", debounce_seconds=2.0),
            Rule("off", "match", pattern="alarm", enabled=False),
            Rule("other", "match", pattern="alarm", streams=("cam-2", "door-*")),
            Rule("glob", "match", pattern="alarm", streams=("cam-?",), cooldown_seconds=0.0),
        ]
    )
    assert [r.rule_id for r in rules.rules] == ["keep", "edit", "glob"]
    fired = rules.observe(Observation("2-0", "alarm", False, 0.0, 3.0))
    assert sorted(a.rule_id for a in fired) == ["glob", "keep"]  # "edit" starts over at 3 s
    assert [a.rule_id for a in rules.observe(Observation("3-0", "alarm", False, 0.0, 5.0))] == ["edit"]


def test_observation_from_a_caption_event() -> None:
    ev = CaptionEvent(3, 1, 20.0, 30.0, "A dog barks.", True, event_id="17-2")
    assert Observation.from_caption(ev) == Observation("17-2", "A dog barks.", True, 20.0, 30.0, 3)


def test_rule_json_round_trip_and_defaults() -> None:
    rules = [
        Rule("m", "match", pattern="glass", streams=("door-*",), webhook_url="https://hooks.example.com/x"),
        Rule("r", "match", pattern=r"alarm|siren", regex=True, finals_only=True, debounce_seconds=2),
        Rule("a", "answer_true", source="q1", debounce_seconds=1.5, cooldown_seconds=0),
        Rule("c", "changed", enabled=False),
        Rule("s", "silence", silence_seconds=30, silence_dbfs=-60),
    ]
    for rule in rules:
        assert Rule.from_json(rule.to_json()) == rule
        assert Rule.from_json(rule.to_json()).to_json() == rule.to_json()
    doc = json.loads(Rule("x", "match", pattern="p").to_json())
    assert doc == {
        "rule_id": "x",
        "kind": "match",
        "pattern": "p",
        "regex": False,
        "source": "caption",
        "streams": [],
        "finals_only": False,
        "debounce_seconds": 0.0,
        "cooldown_seconds": 60.0,
        "silence_seconds": 10.0,
        "silence_dbfs": -50.0,
        "webhook_url": "",
        "enabled": True,
    }
    assert isinstance(rules[1].debounce_seconds, float)


BAD: list[tuple[Any, str]] = [
    ("[1]", "JSON object"),
    ("{nope", "not valid JSON"),
    ({"kind": "match", "pattern": "x"}, "needs rule_id"),
    ({"rule_id": "x", "kind": "shout"}, "kind must be one of"),
    ({"rule_id": "bad id", "kind": "match", "pattern": "x"}, "rule_id must match"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "colour": 1}, "no field(s) 'colour'"),
    ({"rule_id": "x", "kind": "match"}, "pattern must be 1 to 200"),
    ({"rule_id": "x", "kind": "match", "pattern": "a" * 201}, "pattern must be 1 to 200"),
    (
        {"rule_id": "x", "kind": "match", "pattern": "(unclosed", "regex": True},
        "not a valid regular expression",
    ),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "webhook_url": "ftp://h/x"}, "http:// or https://"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "webhook_url": "http://"}, "http:// or https://"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "webhook_url": "http://h:99999/"}, "not a valid URL"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "webhook_url": "no url"}, "http:// or https://"),
    ({"rule_id": "x", "kind": "answer_true"}, "needs a question id"),
    ({"rule_id": "x", "kind": "answer_true", "source": "a question"}, "source (a question id"),
    ({"rule_id": "x", "kind": "changed", "pattern": "x"}, "match rules only"),
    ({"rule_id": "x", "kind": "silence", "debounce_seconds": 1}, "does not apply to silence"),
    ({"rule_id": "x", "kind": "silence", "source": "q1"}, "leave source"),
    ({"rule_id": "x", "kind": "silence", "silence_dbfs": 3}, "silence_dbfs must be a number within"),
    ({"rule_id": "x", "kind": "silence", "silence_seconds": 0}, "silence_seconds must be"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "debounce_seconds": -1}, "debounce_seconds must"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "cooldown_seconds": True}, "cooldown_seconds must"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "cooldown_seconds": "5"}, "cooldown_seconds must"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "enabled": 1}, "enabled must be true or false"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "streams": "cam"}, "streams must be a list"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "streams": ["a b"]}, "each stream must be"),
    ({"rule_id": "x", "kind": "match", "pattern": "x", "streams": [""]}, "each stream must be"),
]


@pytest.mark.parametrize(("doc", "message"), BAD)
def test_invalid_rules_are_refused_with_a_clear_message(doc: Any, message: str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(InvalidArgument) as e:
        Rule.from_json(text)
    assert message in str(e.value)


def test_alert_json_round_trip_and_ids() -> None:
    alert = Alert(
        "0001-ab", "acme", "cam-1", "r1", "match", "An alarm.", 1.5, 11.5, 1_700_000_000.25, "5-0", ""
    )
    assert Alert.from_json(alert.to_json()) == alert
    assert Alert.from_dict({**alert.to_dict(), "window_start": 1}).window_start == 1.0
    with pytest.raises(InvalidArgument, match="window_end must be a float"):
        Alert.from_dict({**alert.to_dict(), "window_end": "soon"})
    with pytest.raises(InvalidArgument, match="fields"):
        Alert.from_dict({**alert.to_dict(), "extra": 1})
    ids = [new_alert_id(1_700_000_000.0 + i / 1000) for i in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert len({new_alert_id(1.0) for _ in range(50)}) == 50
