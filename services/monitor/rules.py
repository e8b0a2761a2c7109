"""Monitoring rules, the alerts they raise, and their evaluation on one stream.

A :class:`Rule` says when a tenant wants to hear about a stream: a caption or answer that
matches a keyword or regex (``match``), a yes/no question answered yes (``answer_true``), a
final caption that differs from the one before (``changed``), or audio below a level for a
while (``silence``). :class:`StreamRules` evaluates a stream's rules on its observations, in
stream time (seconds of the stream's audio, from the events, never the wall clock), and returns
:class:`Alert` records. :class:`RuleStore` keeps each tenant's rules in Redis.
"""

from __future__ import annotations

import builtins
import json
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import redis
import redis.asyncio

from services.errors import InvalidArgument, NotFound, ResourceExhausted
from services.monitor.limits import DAY_SECONDS, MonitorLimits
from services.transport import keys
from services.wire.events import CaptionEvent

MATCH, ANSWER_TRUE, CHANGED, SILENCE = "match", "answer_true", "changed", "silence"
KINDS = (MATCH, ANSWER_TRUE, CHANGED, SILENCE)
CAPTION = "caption"  # the source of a rule that reads captions (else: a question id)
NO_AUDIO = -math.inf  # the level of a span in which no audio arrived at all
MAX_PATTERN_CHARS = 200
MAX_TEXT_CHARS = 2000  # a match reads this much of a caption at most
MAX_STREAMS = 100  # stream ids/patterns per rule
MAX_STREAM_CHARS = 128
MAX_URL_CHARS = 2048
MAX_SECONDS = 7 * DAY_SECONDS  # the longest debounce, cooldown or silence
MIN_DBFS = -120.0
MIN_SECRET_CHARS, MAX_SECRET_CHARS = 16, 256
_EPS = 1e-6  # s: stream times are sums of floats
_NAME_RULE = "^[A-Za-z0-9._-]{1,64}$"


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not keys.monitor_name_ok(value):
        raise InvalidArgument(f"{what} must match {_NAME_RULE}, got {value!r}.")
    return value


def _keyword_matcher(keyword: str) -> re.Pattern[str]:
    """A keyword matches case-insensitively where a word starts ("dog" matches "Dogs bark", not
    "hotdog"); CJK text has no word boundaries, so there it matches anywhere."""
    lead = r"(?<![A-Za-z0-9_])" if re.match(r"[A-Za-z0-9_]", keyword) else ""
    return re.compile(lead + re.escape(keyword), re.IGNORECASE)


@dataclass(frozen=True)
class Rule:
    """One monitoring rule of a tenant (validated on construction; InvalidArgument says why).

    Defaults: ``source`` "caption", every stream of the tenant, interims count, no debounce, a
    60 s cooldown, silence = below -50 dBFS for 10 s, no webhook, enabled.
    """

    rule_id: str
    kind: str
    pattern: str = ""  # match: a keyword (see _keyword_matcher) or, with regex, a regular expression
    regex: bool = False  # match: pattern is a regex (searched case-insensitively)
    source: str = CAPTION  # "caption" or a question id (match, answer_true, changed)
    streams: tuple[str, ...] = ()  # session ids or globs (* and ?); () = every stream of the tenant
    finals_only: bool = False  # match, answer_true: only final captions/answers count
    debounce_seconds: float = 0.0  # s of stream time the condition must hold before it fires
    cooldown_seconds: float = 60.0  # s of stream time after a firing before the rule fires again
    silence_seconds: float = 10.0  # silence: s below silence_dbfs (or without audio) before it fires
    silence_dbfs: float = -50.0  # silence: the level, RMS dBFS, under which audio counts as silent
    webhook_url: str = ""  # http(s) URL each alert is POSTed to; "" = none
    enabled: bool = True
    _matcher: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name("rule_id", self.rule_id)
        where = f"rule {self.rule_id!r}"
        if self.kind not in KINDS:
            raise InvalidArgument(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        for name in ("regex", "finals_only", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{where}: {name} must be true or false, got {getattr(self, name)!r}.")
        for name, low, high in (
            ("debounce_seconds", 0.0, MAX_SECONDS),
            ("cooldown_seconds", 0.0, MAX_SECONDS),
            ("silence_seconds", _EPS, MAX_SECONDS),
            ("silence_dbfs", MIN_DBFS, 0.0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise InvalidArgument(
                    f"{where}: {name} must be a number within [{low:g}, {high:g}], got {value!r}."
                )
            object.__setattr__(self, name, float(value))
        self._check_source(where)
        self._check_pattern(where)
        self._check_streams(where)
        self._check_url(where)
        if self.kind in (CHANGED, SILENCE) and self.debounce_seconds:
            hold = "silence_seconds" if self.kind == SILENCE else "nothing (a change is an instant)"
            raise InvalidArgument(
                f"{where}: debounce_seconds does not apply to {self.kind}; it waits {hold}."
            )

    def _check_source(self, where: str) -> None:
        if self.source != CAPTION:
            _check_name(f"{where}: source (a question id, or {CAPTION!r})", self.source)
        if self.kind == ANSWER_TRUE and self.source == CAPTION:
            raise InvalidArgument(f"{where}: answer_true needs a question id as its source.")
        if self.kind == SILENCE and self.source != CAPTION:
            raise InvalidArgument(f"{where}: silence reads audio levels; leave source at {CAPTION!r}.")

    def _check_pattern(self, where: str) -> None:
        if not isinstance(self.pattern, str):
            raise InvalidArgument(f"{where}: pattern must be a string.")
        if self.kind != MATCH:
            if self.pattern or self.regex:
                raise InvalidArgument(f"{where}: pattern and regex apply to match rules only.")
            return
        if not self.pattern.strip() or len(self.pattern) > MAX_PATTERN_CHARS:
            raise InvalidArgument(f"{where}: pattern must be 1 to {MAX_PATTERN_CHARS} characters.")
        try:
            matcher = (
                re.compile(self.pattern, re.IGNORECASE) if self.regex else _keyword_matcher(self.pattern)
            )
        except re.error as e:
            raise InvalidArgument(f"{where}: pattern is not a valid regular expression: {e}.") from e
        object.__setattr__(self, "_matcher", matcher)

    def _check_streams(self, where: str) -> None:
        if not isinstance(self.streams, tuple) or len(self.streams) > MAX_STREAMS:
            raise InvalidArgument(f"{where}: streams must be a list of at most {MAX_STREAMS} stream ids.")
        for s in self.streams:
            if (
                not isinstance(s, str)
                or not 0 < len(s) <= MAX_STREAM_CHARS
                or any(c.isspace() or c in "{}[]" for c in s)
            ):
                raise InvalidArgument(
                    f"{where}: each stream must be a session id or a glob with * and ? (1 to "
                    f"{MAX_STREAM_CHARS} characters, no whitespace, braces or brackets), got {s!r}."
                )

    def _check_url(self, where: str) -> None:
        url = self.webhook_url
        if not isinstance(url, str):
            raise InvalidArgument(f"{where}: webhook_url must be a string.")
        if not url:
            return
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
            _ = parts.port  # raises ValueError for a bad port
        except ValueError as e:
            raise InvalidArgument(f"{where}: webhook_url is not a valid URL: {e}.") from e
        if len(url) > MAX_URL_CHARS or parts.scheme not in ("http", "https") or not host:
            raise InvalidArgument(
                f"{where}: webhook_url must be an http:// or https:// URL with a host, at most "
                f"{MAX_URL_CHARS} characters, got {url[:100]!r}."
            )

    def applies_to(self, stream: str) -> bool:
        return not self.streams or any(fnmatchcase(stream, p) for p in self.streams)

    def matches(self, text: str) -> bool:
        """Whether a match rule's pattern occurs in ``text``."""
        return self._matcher is not None and self._matcher.search(text[:MAX_TEXT_CHARS]) is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            name: list(self.streams) if name == "streams" else getattr(self, name) for name in _RULE_FIELDS
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Rule:
        if not isinstance(doc, Mapping):
            raise InvalidArgument("a rule must be a JSON object.")
        unknown = sorted(set(doc) - set(_RULE_FIELDS))
        if unknown:
            raise InvalidArgument(f"a rule has no field(s) {', '.join(map(repr, unknown))}.")
        missing = [name for name in ("rule_id", "kind") if name not in doc]
        if missing:
            raise InvalidArgument(f"a rule needs {' and '.join(missing)}.")
        values = dict(doc)
        if "streams" in values:
            if not isinstance(values["streams"], list):
                raise InvalidArgument("a rule's streams must be a list of stream ids.")
            values["streams"] = tuple(values["streams"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> Rule:
        return cls.from_dict(_load_object(text, "a rule"))


_RULE_FIELDS = (
    "rule_id",
    "kind",
    "pattern",
    "regex",
    "source",
    "streams",
    "finals_only",
    "debounce_seconds",
    "cooldown_seconds",
    "silence_seconds",
    "silence_dbfs",
    "webhook_url",
    "enabled",
)


def _load_object(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}.") from e


def new_alert_id(wall_time: float) -> str:
    """A unique id that sorts by creation time: unix milliseconds, then 10 random hex digits."""
    return f"{int(wall_time * 1000):013d}-{secrets.token_hex(5)}"


@dataclass(frozen=True)
class Alert:
    """A rule fired on a stream. Times: ``window_*`` in stream seconds, ``wall_time`` unix s."""

    alert_id: str
    tenant: str
    stream: str
    rule_id: str
    kind: str
    text: str  # the caption or answer that fired it, or a description (changed, silence)
    window_start: float
    window_end: float
    wall_time: float
    event_id: str = ""  # the caption event that fired it ("" for silence)
    question_id: str = ""  # the question whose answer fired it ("" for captions)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ALERT_TYPES}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Alert:
        if not isinstance(doc, Mapping) or set(doc) - set(_ALERT_TYPES):
            raise InvalidArgument(f"an alert must be a JSON object with fields {', '.join(_ALERT_TYPES)}.")
        values: dict[str, Any] = {}
        for name, kind in _ALERT_TYPES.items():
            value = doc.get(name, "" if name in ("event_id", "question_id") else None)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind):
                raise InvalidArgument(f"an alert's {name} must be a {kind.__name__}, got {value!r}.")
            values[name] = value
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> Alert:
        return cls.from_dict(_load_object(text, "an alert"))


_ALERT_TYPES: dict[str, type] = {
    "alert_id": str,
    "tenant": str,
    "stream": str,
    "rule_id": str,
    "kind": str,
    "text": str,
    "window_start": float,
    "window_end": float,
    "wall_time": float,
    "event_id": str,
    "question_id": str,
}


@dataclass(frozen=True)
class Observation:
    """A caption (``question_id`` "") or an answer to a question, as rules see it."""

    event_id: str
    text: str
    is_final: bool
    window_start: float  # stream s
    window_end: float  # stream s
    segment_id: int = 0
    question_id: str = ""
    answer: bool | None = None  # the yes/no reading of text (answers.yes_no); None = neither

    @classmethod
    def from_caption(cls, event: CaptionEvent) -> Observation:
        return cls(
            event.event_id,
            event.text,
            event.is_final,
            event.window_start,
            event.window_end,
            event.segment_id,
            event.question_id,
            event.answer,
        )


@dataclass
class _State:
    """Where one rule stands on one stream."""

    onset: float | None = None  # stream s since which the condition holds (None = it does not)
    fired: bool = False  # this onset has fired
    last_fired: float | None = None  # stream s of the last firing
    previous: tuple[int, str, str] | None = None  # changed: (segment, normalised, text) of the last final


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def _entry_id(event_id: str) -> tuple[int, int] | None:
    ms, sep, seq = event_id.partition("-")
    return (int(ms), int(seq)) if sep and ms.isdigit() and seq.isdigit() else None


class StreamRules:
    """The rules of one stream and their state.

    Each rule is idle until its condition holds, pending while it has held for less than its
    debounce (``silence_seconds`` for silence), and fires once per onset; a condition that turns
    false returns it to idle. A firing within ``cooldown_seconds`` of the previous one waits until
    the cooldown has passed (and is dropped if the condition ends first). Stream time is the latest
    ``window_end`` or level time seen; observations are taken in arrival order, and one whose
    event id (a Redis stream id) is not newer than the last of its source is a replay and ignored.
    """

    def __init__(
        self,
        stream: str,
        tenant: str,
        rules: Iterable[Rule] = (),
        start_time: float = 0.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``start_time``: the stream time observation starts at (where the first level span begins)."""
        self.stream = stream
        self.tenant = tenant
        self._wall_clock = wall_clock
        self._rules: dict[str, tuple[Rule, _State]] = {}
        self._time = start_time
        self._level_time = start_time
        self._last_event: dict[str, tuple[int, int]] = {}
        self.replace_rules(rules)

    @property
    def rules(self) -> list[Rule]:
        return [rule for rule, _state in self._rules.values()]

    def replace_rules(self, rules: Iterable[Rule]) -> None:
        """Use ``rules`` (those enabled and applying to this stream); an unchanged rule keeps its state."""
        kept: dict[str, tuple[Rule, _State]] = {}
        for rule in rules:
            if rule.enabled and rule.applies_to(self.stream):
                old = self._rules.get(rule.rule_id)
                kept[rule.rule_id] = (rule, old[1] if old is not None and old[0] == rule else _State())
        self._rules = kept

    def observe(self, obs: Observation) -> list[Alert]:
        """Alerts fired by a caption or answer."""
        entry = _entry_id(obs.event_id)
        if entry is not None:
            last = self._last_event.get(obs.question_id)
            if last is not None and entry <= last:
                return []
            self._last_event[obs.question_id] = entry
        self._time = max(self._time, obs.window_end)
        source = obs.question_id or CAPTION
        alerts = []
        for rule, state in self._rules.values():
            if rule.kind == SILENCE or rule.source != source:
                continue
            if rule.kind == CHANGED:
                text = self._changed(rule, state, obs)
                if text is not None:
                    alerts.append(self._alert(rule, text, obs.window_start, obs.window_end, obs))
                continue
            if rule.finals_only and not obs.is_final:
                continue
            holds = rule.matches(obs.text) if rule.kind == MATCH else obs.answer
            if holds is not None and self._hold(rule, state, holds, self._time, rule.debounce_seconds):
                alerts.append(self._alert(rule, obs.text, obs.window_start, obs.window_end, obs))
        return alerts

    def observe_level(self, stream_time_end: float, dbfs: float) -> list[Alert]:
        """Alerts fired by the audio level (RMS dBFS) of the span since the previous call (since
        ``start_time`` for the first) ending at ``stream_time_end``. A span in which no audio arrived
        is reported with ``NO_AUDIO``: the caller advances stream time by the wall time waited."""
        start = self._level_time
        if stream_time_end <= start:
            return []
        self._level_time = stream_time_end
        self._time = max(self._time, stream_time_end)
        alerts = []
        for rule, state in self._rules.values():
            if rule.kind != SILENCE:
                continue
            quiet = dbfs < rule.silence_dbfs
            if quiet and state.onset is None:
                state.onset = start
            onset = state.onset
            if onset is not None and self._hold(rule, state, quiet, stream_time_end, rule.silence_seconds):
                held = stream_time_end - onset
                text = (
                    f"no audio for {held:.1f} s"
                    if dbfs == NO_AUDIO
                    else f"silence below {rule.silence_dbfs:g} dBFS for {held:.1f} s"
                )
                alerts.append(self._alert(rule, text, onset, stream_time_end, None))
        return alerts

    @staticmethod
    def _hold(rule: Rule, state: _State, holds: bool, now: float, hold_seconds: float) -> bool:
        """Advance the rule's state machine; True when it fires now."""
        if not holds:
            state.onset, state.fired = None, False
            return False
        if state.onset is None:
            state.onset = now
        if state.fired or now - state.onset < hold_seconds - _EPS:
            return False
        if state.last_fired is not None and now - state.last_fired < rule.cooldown_seconds - _EPS:
            return False
        state.fired, state.last_fired = True, now
        return True

    def _changed(self, rule: Rule, state: _State, obs: Observation) -> str | None:
        """The description of a change when this final differs from the previous segment's."""
        if not obs.is_final or (state.previous is not None and state.previous[0] == obs.segment_id):
            return None  # an interim, or another final of the same segment
        previous, state.previous = state.previous, (obs.segment_id, _normalise(obs.text), obs.text)
        if previous is None or previous[1] == state.previous[1]:
            return None
        if state.last_fired is not None and self._time - state.last_fired < rule.cooldown_seconds - _EPS:
            return None
        state.last_fired = self._time
        return f"{previous[2]} -> {obs.text}"

    def _alert(self, rule: Rule, text: str, start: float, end: float, obs: Observation | None) -> Alert:
        wall = self._wall_clock()
        return Alert(
            alert_id=new_alert_id(wall),
            tenant=self.tenant,
            stream=self.stream,
            rule_id=rule.rule_id,
            kind=rule.kind,
            text=text,
            window_start=start,
            window_end=end,
            wall_time=wall,
            event_id=obs.event_id if obs else "",
            question_id=obs.question_id if obs else "",
        )


# --- storage -------------------------------------------------------------------------------------

_PUT_LUA = """
-- KEYS: rules hash, version counter; ARGV: rule id, rule JSON, max rules
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCR', KEYS[2])
"""

_ENSURE_SECRET_LUA = """
-- KEYS: secret; ARGV: a new secret, set only when there is none
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

_DELETE_LUA = """
-- KEYS: rules hash, version counter; ARGV: rule id
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return -1
end
return redis.call('INCR', KEYS[2])
"""


def _rule_keys(tenant: str) -> list[str]:
    """The keys the rule scripts touch (one hash tag: the tenant's)."""
    return [keys.monitor_rules(tenant), keys.monitor_rules_version(tenant)]


def _put_result(version: int, tenant: str, max_rules: int) -> int:
    if version < 0:
        raise ResourceExhausted(
            f"tenant {tenant!r} already has {max_rules} rules, the most allowed; delete one first."
        )
    return version


def _get_result(raw: bytes | None, tenant: str, rule_id: str) -> Rule:
    if raw is None:
        raise NotFound(f"tenant {tenant!r} has no rule {rule_id!r}.")
    return Rule.from_json(raw)


def _delete_result(version: int, tenant: str, rule_id: str) -> int:
    if version < 0:
        raise NotFound(f"tenant {tenant!r} has no rule {rule_id!r}.")
    return version


def _list_result(raw: Mapping[bytes, bytes]) -> list[Rule]:
    return sorted((Rule.from_json(v) for v in raw.values()), key=lambda r: r.rule_id)


def _check_secret(secret: str) -> str:
    if (
        not isinstance(secret, str)
        or not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS
        or not secret.isprintable()
        or any(c.isspace() for c in secret)
    ):
        raise InvalidArgument(
            f"a webhook secret must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} printable characters "
            "without whitespace."
        )
    return secret


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


class RuleStore:
    """A tenant's rules (hash rule id -> JSON) and webhook secret in Redis (asyncio client).

    ``version(tenant)`` grows with every change of the tenant's rules, so a gateway can poll it
    cheaply and reload only when it moved.
    """

    def __init__(self, client: redis.asyncio.Redis, limits: MonitorLimits | None = None) -> None:
        self.client = client
        self.max_rules = (limits or MonitorLimits()).max_rules
        self._put = client.register_script(_PUT_LUA)
        self._delete = client.register_script(_DELETE_LUA)
        self._ensure_secret = client.register_script(_ENSURE_SECRET_LUA)

    async def put(self, tenant: str, rule: Rule) -> int:
        """Add or replace ``rule``; the new version. ResourceExhausted past ``max_rules``."""
        version = int(
            await self._put(keys=_rule_keys(tenant), args=[rule.rule_id, rule.to_json(), self.max_rules])
        )
        return _put_result(version, tenant, self.max_rules)

    async def get(self, tenant: str, rule_id: str) -> Rule:
        """The rule (NotFound when the tenant has none of that id)."""
        raw = await self.client.hget(keys.monitor_rules(tenant), _check_name("rule_id", rule_id))
        return _get_result(raw, tenant, rule_id)

    async def delete(self, tenant: str, rule_id: str) -> int:
        """Delete a rule; the new version (NotFound when the tenant has none of that id)."""
        version = int(await self._delete(keys=_rule_keys(tenant), args=[_check_name("rule_id", rule_id)]))
        return _delete_result(version, tenant, rule_id)

    async def list(self, tenant: str) -> builtins.list[Rule]:
        """Every rule of the tenant, by rule id."""
        return _list_result(await self.client.hgetall(keys.monitor_rules(tenant)))

    async def version(self, tenant: str) -> int:
        return int(await self.client.get(keys.monitor_rules_version(tenant)) or 0)

    async def set_webhook_secret(self, tenant: str, secret: str) -> None:
        await self.client.set(keys.monitor_webhook_secret(tenant), _check_secret(secret))

    async def webhook_secret(self, tenant: str) -> str | None:
        return _text(await self.client.get(keys.monitor_webhook_secret(tenant)))

    async def ensure_webhook_secret(self, tenant: str) -> str:
        """The tenant's webhook secret, made (``secrets.token_urlsafe``) when it has none."""
        raw = await self._ensure_secret(
            keys=[keys.monitor_webhook_secret(tenant)], args=[secrets.token_urlsafe(32)]
        )
        return str(_text(raw))


class SyncRuleStore:
    """:class:`RuleStore` on a synchronous Redis client (for the command line)."""

    def __init__(self, client: redis.Redis, limits: MonitorLimits | None = None) -> None:
        self.client = client
        self.max_rules = (limits or MonitorLimits()).max_rules
        self._put = client.register_script(_PUT_LUA)
        self._delete = client.register_script(_DELETE_LUA)
        self._ensure_secret = client.register_script(_ENSURE_SECRET_LUA)

    def put(self, tenant: str, rule: Rule) -> int:
        version = int(self._put(keys=_rule_keys(tenant), args=[rule.rule_id, rule.to_json(), self.max_rules]))
        return _put_result(version, tenant, self.max_rules)

    def get(self, tenant: str, rule_id: str) -> Rule:
        raw = self.client.hget(keys.monitor_rules(tenant), _check_name("rule_id", rule_id))
        return _get_result(raw, tenant, rule_id)

    def delete(self, tenant: str, rule_id: str) -> int:
        version = int(self._delete(keys=_rule_keys(tenant), args=[_check_name("rule_id", rule_id)]))
        return _delete_result(version, tenant, rule_id)

    def list(self, tenant: str) -> builtins.list[Rule]:
        return _list_result(self.client.hgetall(keys.monitor_rules(tenant)))

    def version(self, tenant: str) -> int:
        return int(self.client.get(keys.monitor_rules_version(tenant)) or 0)

    def set_webhook_secret(self, tenant: str, secret: str) -> None:
        self.client.set(keys.monitor_webhook_secret(tenant), _check_secret(secret))

    def webhook_secret(self, tenant: str) -> str | None:
        return _text(self.client.get(keys.monitor_webhook_secret(tenant)))

    def ensure_webhook_secret(self, tenant: str) -> str:
        raw = self._ensure_secret(
            keys=[keys.monitor_webhook_secret(tenant)], args=[secrets.token_urlsafe(32)]
        )
        return str(_text(raw))
