"""The monitoring API of the gateway's web server: rules, the webhook secret, alerts and their
clips, the history, and a live session's questions (mounted by :mod:`services.gateway.http`).

JSON in and out; errors are ``{"error": "..."}``: 400 bad input, 401 no or wrong key (when the
gateway has keys), 403 a missing scope or someone else's session, 404, 415 a body that is not
``application/json``, 429 a full store (``Retry-After`` when known). Every call is scoped to the
caller's tenant (``Principal.tenant``; ``""`` on an open gateway), never to a tenant the request
names, and needs the ``monitor`` scope (``admin`` implies it). The one exception is
``PUT /api/sessions/{sid}/questions``: the session's tenant (with ``stream`` or ``monitor``), an
admin, or whoever sends the session's resume secret in ``X-Resume-Secret``.

Routes::

    GET    /api/rules                     -> {"rules": [rule, ...]}
    GET    /api/rules/{rule_id}           -> {"rule": rule}
    PUT    /api/rules/{rule_id}           rule fields -> {"rule": rule, "version": N}
    DELETE /api/rules/{rule_id}           -> 204
    GET    /api/webhook-secret            -> {"secret": "..."}
    GET    /api/alerts?stream=&limit=     -> {"alerts": [alert + has_clip, ...]} newest first
    GET    /api/alerts/{alert_id}/clip.wav -> audio/wav
    GET    /api/history?q=&stream=&since=&until=&kind=&limit=&before=&format=json|vtt
                                          -> {"entries": [...], "before": cursor | null} or text/vtt
    PUT    /api/sessions/{sid}/questions  {"questions": [{"id", "text"}]} -> {"questions": [...]}

The stores use a ``redis.asyncio`` client made in the web server's own loop (at startup).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from services.gateway.live import LiveGateway, is_session_id
from services.monitor import history as hist
from services.monitor.clips import ClipStore
from services.monitor.history import HistoryStore, to_webvtt
from services.monitor.limits import MonitorLimits
from services.monitor.rules import Alert, Rule, RuleStore
from services.principal import MONITOR, STREAM, Principal, secret_matches
from services.transport import keys
from services.transport.connect import connect_async
from services.wire.settings import Question, questions_from_json, questions_to_json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PrincipalOf = Callable[[web.Request], Principal]

SECRET_HEADER = "X-Resume-Secret"  # a session's resume secret, for its questions and downloads
ALERTS_DEFAULT_LIMIT, ALERTS_MAX_LIMIT = 50, 500
ALERTS_PAGE = 200  # alert stream entries read per Redis call
ALERTS_SCAN_MAX = 10_000  # entries one /api/alerts call reads at most (the stream's cap)
HISTORY_DEFAULT_LIMIT = 100
HISTORY_VTT_LIMIT = hist.MAX_LIMIT  # a WebVTT export takes this many entries unless told
JSON_TYPES = ("application/json",)


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _too_many(handler: Handler) -> Handler:
    """ResourceExhausted -> 429 with ``Retry-After`` when known (the app's middleware answers the
    other named errors)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ResourceExhausted as e:
            resp = json_error(429, str(e))
            if e.retry_after is not None:
                resp.headers["Retry-After"] = str(max(1, math.ceil(e.retry_after)))
            return resp

    return wrapped


async def _json_body(request: web.Request) -> Any:
    if request.content_type not in JSON_TYPES:
        raise web.HTTPUnsupportedMediaType(reason="the body must be sent as Content-Type: application/json")
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"the request body must be JSON: {e}") from e


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise InvalidArgument(f"{name} must be a whole number, got {raw!r}") from e
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be within [{low}, {high}], got {value}")
    return value


def _time_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name, "")
    if raw == "":
        return None
    try:
        value = float(raw)
    except ValueError as e:
        raise InvalidArgument(f"{name} must be unix seconds, got {raw!r}") from e
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{name} must be unix seconds (a finite number >= 0), got {raw!r}")
    return value


def _alert_of(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    raw = fields.get(b"alert")
    if raw is None:
        return None
    try:
        alert = Alert.from_json(raw).to_dict()
    except InvalidArgument:
        return None  # an entry no gateway wrote: leave it out
    return alert | {"has_clip": fields.get(b"has_clip") == b"1"}


class MonitorApi:
    """Handlers of the monitoring routes of one gateway's web server."""

    def __init__(
        self,
        gateway: LiveGateway,
        redis_url: str,
        principal_of: PrincipalOf,
        limits: MonitorLimits | None = None,
    ) -> None:
        self.gateway = gateway
        monitor = gateway.monitor
        self.redis_url = redis_url or (monitor.redis_url if monitor is not None else "")
        self.limits = limits or (monitor.limits if monitor is not None else MonitorLimits())
        self.principal_of = principal_of
        self.client: Any = None
        self._rules: RuleStore | None = None
        self._clips: ClipStore | None = None
        self._history: HistoryStore | None = None

    def mount(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/rules", _too_many(self.list_rules))
        r.add_get("/api/rules/{rule_id}", _too_many(self.get_rule))
        r.add_put("/api/rules/{rule_id}", _too_many(self.put_rule))
        r.add_delete("/api/rules/{rule_id}", _too_many(self.delete_rule))
        r.add_get("/api/webhook-secret", _too_many(self.webhook_secret))
        r.add_get("/api/alerts", _too_many(self.alerts))
        r.add_get("/api/alerts/{alert_id}/clip.wav", _too_many(self.clip))
        r.add_get("/api/history", _too_many(self.history))
        r.add_put("/api/sessions/{sid}/questions", _too_many(self.put_questions))
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        if not self.redis_url:
            return  # the routes answer 503
        self.client = connect_async(self.redis_url, socket_timeout=10.0)
        self._rules = RuleStore(self.client, self.limits)
        self._clips = ClipStore(self.client, self.limits)
        self._history = HistoryStore(self.client, self.limits)

    async def _stop(self, app: web.Application) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # --- helpers --------------------------------------------------------------------------------

    def _tenant(self, request: web.Request) -> str:
        """The caller's tenant, once it holds the monitor scope."""
        principal = self.principal_of(request)
        if not principal.allows(MONITOR):
            raise PermissionDenied(f"these credentials lack the {MONITOR!r} scope")
        return principal.tenant

    def _stores(self) -> tuple[RuleStore, ClipStore, HistoryStore]:
        if self._rules is None or self._clips is None or self._history is None:
            raise Unavailable("the monitoring API is not available: this web server has no Redis URL")
        return self._rules, self._clips, self._history

    def _changed(self) -> None:
        """Rules changed: the gateway's monitor re-reads them at its next round."""
        if self.gateway.monitor is not None:
            self.gateway.monitor.refresh_now()

    # --- rules ----------------------------------------------------------------------------------

    async def list_rules(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        rules = await self._stores()[0].list(tenant)
        return web.json_response({"rules": [r.to_dict() for r in rules]})

    async def get_rule(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        rule = await self._stores()[0].get(tenant, request.match_info["rule_id"])
        return web.json_response({"rule": rule.to_dict()})

    async def put_rule(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        rule_id = request.match_info["rule_id"]
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidArgument("the body must be a JSON object with the rule's fields")
        if "rule_id" in body and body["rule_id"] != rule_id:
            raise InvalidArgument(
                f"the body's rule_id {body['rule_id']!r} differs from the path's {rule_id!r}; "
                "leave it out (the path names the rule)"
            )
        rule = Rule.from_dict(body | {"rule_id": rule_id})
        version = await self._stores()[0].put(tenant, rule)
        self._changed()
        return web.json_response({"rule": rule.to_dict(), "version": version})

    async def delete_rule(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        await self._stores()[0].delete(tenant, request.match_info["rule_id"])
        self._changed()
        return web.Response(status=204)

    async def webhook_secret(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        secret = await self._stores()[0].ensure_webhook_secret(tenant)
        return web.json_response({"secret": secret}, headers={"Cache-Control": "no-store"})

    # --- alerts and clips -----------------------------------------------------------------------

    async def alerts(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        self._stores()
        stream = request.query.get("stream", "")
        limit = _int_param(request, "limit", ALERTS_DEFAULT_LIMIT, 1, ALERTS_MAX_LIMIT)
        key = keys.monitor_alerts(tenant)
        found: list[dict[str, Any]] = []
        top, scanned = "+", 0
        while scanned < ALERTS_SCAN_MAX and len(found) < limit:
            rows = await self.client.xrevrange(key, max=top, min="-", count=ALERTS_PAGE)
            for _raw_id, fields in rows:
                scanned += 1
                alert = _alert_of(fields)
                if alert is not None and (not stream or alert["stream"] == stream):
                    found.append(alert)
                    if len(found) == limit:
                        break
            if len(rows) < ALERTS_PAGE:
                break
            top = "(" + rows[-1][0].decode()
        return web.json_response({"alerts": found}, headers={"Cache-Control": "no-store"})

    async def clip(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        alert_id = request.match_info["alert_id"]
        if not keys.monitor_name_ok(alert_id):
            raise NotFound(f"there is no alert {alert_id!r}")
        wav = await self._stores()[1].get(tenant, alert_id)
        if wav is None:
            raise NotFound(f"alert {alert_id} has no clip (none was kept, or it expired or was evicted)")
        return web.Response(
            body=wav,
            content_type="audio/wav",
            headers={"Content-Disposition": f'attachment; filename="{alert_id}.wav"'},
        )

    # --- history --------------------------------------------------------------------------------

    async def history(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        store = self._stores()[2]
        q = request.query
        fmt = q.get("format", "json") or "json"
        if fmt not in ("json", "vtt"):
            raise InvalidArgument(f"format must be json or vtt, got {fmt!r}")
        stream = q.get("stream", "")
        if fmt == "vtt" and not stream:
            raise InvalidArgument("format=vtt needs a stream: a WebVTT file holds one stream's entries")
        kinds = tuple(k for k in q.get("kind", "").split(",") if k)
        unknown = sorted(set(kinds) - set(hist.KINDS))
        if unknown:
            raise InvalidArgument(f"kind must be among {', '.join(hist.KINDS)}, got {', '.join(unknown)}")
        since, until = _time_param(request, "since"), _time_param(request, "until")
        if since is not None and until is not None and since > until:
            raise InvalidArgument(f"since ({since:g}) is after until ({until:g})")
        default = HISTORY_VTT_LIMIT if fmt == "vtt" else HISTORY_DEFAULT_LIMIT
        limit = _int_param(request, "limit", default, 1, hist.MAX_LIMIT)
        page = await store.search(
            tenant,
            text=q.get("q", ""),
            stream=stream,
            since=since,
            until=until,
            kinds=kinds,
            limit=limit,
            before=q.get("before") or None,
        )
        if fmt == "vtt":
            return web.Response(
                text=to_webvtt(page.entries),
                content_type="text/vtt",
                charset="utf-8",
                headers={"Content-Disposition": f'attachment; filename="{stream}.vtt"'},
            )
        return web.json_response(
            {"entries": [e.to_dict() for e in page.entries], "before": page.before or None},
            headers={"Cache-Control": "no-store"},
        )

    # --- a session's questions ------------------------------------------------------------------

    async def put_questions(self, request: web.Request) -> web.Response:
        principal = self.principal_of(request)
        sid = request.match_info["sid"]
        if not is_session_id(sid):
            raise NotFound(f"session {sid!r} does not exist")
        body = await _json_body(request)
        if not isinstance(body, dict) or set(body) != {"questions"}:
            raise InvalidArgument('the body must be {"questions": [{"id": "...", "text": "..."}, ...]}')
        questions = questions_from_json(body["questions"])
        secret = request.headers.get(SECRET_HEADER, "")
        await asyncio.get_running_loop().run_in_executor(
            None, self._set_questions, sid, questions, principal, secret
        )
        return web.json_response({"session_id": sid, "questions": questions_to_json(questions)})

    def _set_questions(
        self, sid: str, questions: tuple[Question, ...], principal: Principal, secret: str
    ) -> None:
        """Blocking (the gateway's Redis client): the secret, or the tenant with a scope that
        streams or watches, or an admin."""
        gw = self.gateway
        if not gw.redis.exists(keys.session_config(sid)):
            raise NotFound(f"session {sid} does not exist or has expired")
        _tenant, stored = gw.owner(sid)
        if not secret_matches(secret, stored) and not (principal.allows(STREAM) or principal.allows(MONITOR)):
            raise PermissionDenied(
                f"changing a session's questions needs the {STREAM!r} or {MONITOR!r} scope, or the "
                "session's resume secret"
            )
        gw.set_questions_of(sid, questions, principal, secret)


def alerts_by_stream(rows: list[tuple[bytes, dict[bytes, bytes]]]) -> dict[str, int]:
    """How many of an alert stream's entries each stream has (the monitoring view's open alerts)."""
    counts: dict[str, int] = {}
    for _id, fields in rows:
        raw = fields.get(b"alert")
        if raw is None:
            continue
        try:
            stream = json.loads(raw).get("stream")
        except (ValueError, AttributeError):
            continue
        if isinstance(stream, str):
            counts[stream] = counts.get(stream, 0) + 1
    return counts
