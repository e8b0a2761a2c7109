"""The gateway's web side: the live page, the monitoring view, WebRTC offers and session read-outs.

Runs an aiohttp application on its own asyncio loop in its own thread, beside the gRPC server of
the same gateway process (HTTPS with the gateway's certificate). Every ``/api/`` route needs
``Authorization: Bearer KEY`` when the gateway has API keys (scopes: ``stream`` for offers,
``monitor`` for the session list; downloads need the session's tenant, admin or its secret);
pages, static files and ``/healthz`` are open. Every request must name this server in ``Host``
(loopback names, the listen address, ``--http-allowed-hosts``) and, when it has an ``Origin``, come
from it: a DNS-rebinding page or a cross-site form gets 421/403. Offers must be
``application/json`` (415). Errors are JSON ``{"error"}``.

Routes: ``GET /``, ``GET /monitor``, ``GET /static/...``, ``GET /healthz``, ``GET /api/config``,
``POST /api/webrtc/offer``, ``GET /api/sessions``, ``GET /api/sessions/{sid}/captions.vtt|json``,
and the monitoring API of :mod:`services.gateway.monitor_api` (rules, alerts, clips, history, a
session's questions).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiortc import RTCIceServer

from services.audio.subtitles import to_webvtt
from services.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.gateway.live import CREATED_FIELD, TENANT_FIELD, LiveGateway, is_session_id
from services.gateway.monitor_api import SECRET_HEADER, MonitorApi, alerts_by_stream, json_error
from services.gateway.webrtc import WebRtcIngest, WebRtcLimits, ice_server_json
from services.principal import MONITOR, STREAM
from services.security import Authenticator, Principal
from services.transport import keys
from services.transport.streams import entry_time
from services.wire.events import CaptionEvent, EndEvent, Event, final_captions, from_fields
from services.wire.settings import (
    SessionSettings,
    questions_to_json,
    session_to_json,
    settings_from_hash,
    settings_from_json,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
MAX_LISTED_SESSIONS = 200  # /api/sessions shows at most this many active sessions
RECENT_SECONDS = 60.0  # ended sessions stay on the monitoring view this long
LATEST_SCAN = 50  # newest caption-stream entries read per session to find its latest caption
OPEN_ALERT_SECONDS = 300.0  # a session's alerts of this long ago count as open on the monitoring view
OPEN_ALERTS_SCAN = 1000  # newest alerts read per tenant for those counts
LEVEL_STALE_SECONDS = 10.0  # a published audio level older than this is unknown
MAX_OFFER_BYTES = 256 * 1024
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' blob: mediastream:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}
START_TIMEOUT_S = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PRINCIPAL = web.RequestKey("principal", Principal)  # who is calling an /api/ route


def _decode(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


class SessionReader:
    """Reads session state for the monitoring view and downloads (blocking Redis; run in a thread)."""

    def __init__(self, gateway: LiveGateway, ingest: WebRtcIngest) -> None:
        self.gateway = gateway
        self.redis = gateway.redis
        self.ingest = ingest
        self._seen: set[str] = set()
        self._ended: dict[str, float] = {}  # sid -> unix time it left the active set
        self._lock = threading.Lock()

    def all_events(self, sid: str) -> list[Event]:
        if not is_session_id(sid):
            raise NotFound(f"session {sid!r} does not exist")
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(keys.session_config(sid))
        pipe.xrange(keys.session_captions(sid), "-", "+", count=self.gateway.defaults.captions_maxlen)
        exists, entries = pipe.execute()
        if not exists and not entries:
            raise NotFound(f"session {sid} does not exist or has expired")
        return [from_fields(i.decode(), f) for i, f in entries]

    def summary(
        self,
        sid: str,
        config: dict[str, str],
        entries: list[tuple[bytes, dict[bytes, bytes]]],
        now: float,
        active: bool,
    ) -> dict[str, Any]:
        latest: dict[str, Any] | None = None
        latest_final: dict[str, Any] | None = None
        ended: EndEvent | None = None
        audio_seconds = 0.0
        for raw_id, raw in entries:  # newest first
            ev = from_fields(raw_id.decode(), raw)
            if isinstance(ev, EndEvent) and ended is None:
                ended = ev
            if not isinstance(ev, CaptionEvent):
                continue
            msg = ev.to_json() | {"age_seconds": round(max(0.0, now - entry_time(ev.event_id)), 1)}
            audio_seconds = max(audio_seconds, ev.audio_seconds)
            if ev.is_answer:  # the card shows the caption; answers are on the timeline
                continue
            if latest is None:
                latest = msg
            if ev.is_final and latest_final is None:
                latest_final = msg
            if latest is not None and latest_final is not None:
                break
        local = self.ingest.session(sid)
        if local is not None:
            audio_seconds = max(audio_seconds, local.seconds)
        created = float(config.get(CREATED_FIELD, 0) or 0)
        try:
            settings = settings_from_hash(config).session
        except InvalidArgument:  # a hash no gateway wrote: show the session anyway
            settings = SessionSettings()
        return {
            "id": sid,
            "active": active,
            "started": created,
            "age_seconds": round(now - created, 1) if created else None,
            "audio_seconds": round(audio_seconds, 2),
            "webrtc": local is not None,
            "prompt": settings.prompt,
            "adapter": settings.adapter,
            "window_seconds": settings.window_seconds,
            "hop_seconds": settings.hop_seconds,
            "questions": questions_to_json(settings.questions),
            "level_dbfs": None,  # filled by sessions() from the tenant's levels
            "open_alerts": 0,
            "latest": latest,
            "latest_final": latest_final,
            "ended": None if ended is None else {"reason": ended.reason.value},
            "ended_at": self._ended.get(sid),
        }

    def sessions(self, principal: Principal) -> dict[str, Any]:
        """Active and recently ended sessions that ``principal`` may see: all for an admin, else
        those of its tenant."""
        now = time.time()
        raw = cast(list[bytes], self.redis.zrevrange(keys.ACTIVE_SESSIONS, 0, MAX_LISTED_SESSIONS - 1))
        active = [r.decode() for r in raw]
        with self._lock:
            for sid in self._seen - set(active):
                self._ended.setdefault(sid, now)
            for sid, (t, _reason) in list(self.ingest.recently_ended.items()):
                if sid not in active:
                    self._ended.setdefault(sid, t)
            self._seen = set(active)
            for sid, t in list(self._ended.items()):
                if now - t > RECENT_SECONDS or sid in self._seen:
                    del self._ended[sid]
            recent = sorted(self._ended, key=self._ended.__getitem__, reverse=True)
        ids = active + recent
        pipe = self.redis.pipeline(transaction=False)
        for sid in ids:
            pipe.hgetall(keys.session_config(sid))
            pipe.xrevrange(keys.session_captions(sid), "+", "-", count=LATEST_SCAN)
        res = pipe.execute()
        out = []
        tenants: dict[str, str] = {}  # sid -> tenant
        for i, sid in enumerate(ids):
            config, entries = _decode(res[2 * i]), res[2 * i + 1]
            if not config and not entries:
                continue  # expired
            if not principal.is_admin and config.get(TENANT_FIELD, "") != principal.tenant:
                continue  # someone else's
            tenants[sid] = config.get(TENANT_FIELD, "")
            out.append(self.summary(sid, config, entries, now, active=i < len(active)))
        self._add_monitoring(out, tenants, now)
        return {
            "now": now,
            "sessions": [s for s in out if s["active"]],
            "recent": [s for s in out if not s["active"]],
        }

    def _add_monitoring(self, out: list[dict[str, Any]], tenants: dict[str, str], now: float) -> None:
        """Each listed session's audio level and its alerts of the last minutes: one pipelined read
        of each tenant's levels hash and newest alerts."""
        names = sorted({t for t in tenants.values() if t == "" or keys.monitor_name_ok(t)})
        if not names:
            return
        pipe = self.redis.pipeline(transaction=False)
        since_ms = int((now - OPEN_ALERT_SECONDS) * 1000)
        for tenant in names:
            pipe.hgetall(keys.monitor_levels(tenant))
            pipe.xrevrange(keys.monitor_alerts(tenant), "+", str(since_ms), count=OPEN_ALERTS_SCAN)
        res = pipe.execute()
        levels: dict[str, dict[str, str]] = {}
        alerts: dict[str, dict[str, int]] = {}
        for i, tenant in enumerate(names):
            levels[tenant] = _decode(res[2 * i])
            alerts[tenant] = alerts_by_stream(res[2 * i + 1])
        for s in out:
            tenant = tenants.get(s["id"], "")
            s["level_dbfs"] = _level(levels.get(tenant, {}).get(s["id"]), now)
            s["open_alerts"] = alerts.get(tenant, {}).get(s["id"], 0)


def _level(value: str | None, now: float) -> float | None:
    """A levels hash value ("dBFS unix_s") -> dBFS; None when absent, stale, or without audio."""
    if not value:
        return None
    level, _, at = value.partition(" ")
    try:
        dbfs, when = float(level), float(at)
    except ValueError:
        return None
    if not math.isfinite(dbfs) or now - when > LEVEL_STALE_SECONDS:
        return None
    return dbfs


class HttpApp:
    """Handlers of the web application (one instance per gateway)."""

    def __init__(
        self,
        gateway: LiveGateway,
        ingest: WebRtcIngest,
        auth: Authenticator | None = None,
        allowed_hosts: frozenset[str] = frozenset(),
        redis_url: str = "",
    ) -> None:
        self.gateway = gateway
        self.ingest = ingest
        self.auth = auth or Authenticator()
        self.allowed_hosts = LOOPBACK_NAMES | {h.lower() for h in allowed_hosts}
        self.reader = SessionReader(gateway, ingest)
        self.monitor_api = MonitorApi(gateway, redis_url, lambda request: request[PRINCIPAL])

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self.guard, self.errors], client_max_size=MAX_OFFER_BYTES)
        app.router.add_get("/", self.page("index.html"))
        app.router.add_get("/monitor", self.page("monitor.html"))
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/api/config", self.config)
        app.router.add_post("/api/webrtc/offer", self.offer)
        app.router.add_get("/api/sessions", self.sessions)
        app.router.add_get("/api/sessions/{sid}/captions.vtt", self.captions_vtt)
        app.router.add_get("/api/sessions/{sid}/captions.json", self.captions_json)
        self.monitor_api.mount(app)
        return app

    def _host_allowed(self, value: str) -> bool:
        """Whether a Host (or Origin's host) names this server: loopback names or a configured
        one. Anything else is a DNS-rebinding page or a misdirected request."""
        host = value.strip().lower()
        if host.startswith("["):  # [v6]:port
            host = host[1 : host.find("]")]
        elif host.count(":") == 1:
            host = host.split(":")[0]
        return host in self.allowed_hosts

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Host and Origin checks (no DNS rebinding, no cross-site requests) and security headers."""
        if not self._host_allowed(request.headers.get("Host", "")):
            return json_error(421, "this server does not answer to that Host name (see --http-allowed-hosts)")
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null":
            if not self._host_allowed(origin.partition("://")[2] or origin):
                return json_error(403, "cross-origin requests are not allowed")
        elif origin == "null" and request.method != "GET":
            return json_error(403, "cross-origin requests are not allowed")
        response = await handler(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Named errors -> 4xx/503 JSON; anything unexpected -> 500 JSON, logged with a traceback."""
        try:
            if request.path.startswith("/api/"):
                request[PRINCIPAL] = self._principal(request)
            return await handler(request)
        except Unauthenticated as e:
            resp = json_error(401, str(e))
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        except PermissionDenied as e:
            return json_error(403, str(e))
        except InvalidArgument as e:
            return json_error(400, str(e))
        except NotFound as e:
            return json_error(404, str(e))
        except (ResourceExhausted, Unavailable) as e:
            resp = json_error(503, str(e))
            retry_after = getattr(e, "retry_after", None)
            if retry_after is not None:
                resp.headers["Retry-After"] = str(max(1, round(retry_after)))
            return resp
        except FailedPrecondition as e:
            return json_error(409, str(e))
        except web.HTTPException as e:
            if request.path.startswith("/api/") and e.status >= 400:
                return json_error(e.status, e.reason)
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return json_error(500, "internal error; see the gateway log")

    @staticmethod
    def _require(request: web.Request, scope: str) -> Principal:
        principal = request[PRINCIPAL]
        if not principal.allows(scope):
            raise PermissionDenied(f"these credentials lack the {scope!r} scope")
        return principal

    def _principal(self, request: web.Request) -> Principal:
        got = request.headers.get("Authorization", "")
        try:
            return self.auth.authenticate({"authorization": got} if got else {}, {})
        except Unauthenticated as e:
            if not got:
                raise Unauthenticated(
                    "this gateway requires an 'Authorization: Bearer <token>' header"
                ) from e
            raise

    def page(self, name: str) -> Handler:
        path = STATIC_DIR / name

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

        return handler

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def config(self, request: web.Request) -> web.Response:
        lim = self.gateway.limits
        authenticated = request[PRINCIPAL].authenticated  # TURN credentials only for them
        return web.json_response(
            {
                "ice_servers": [
                    ice_server_json(s) for s in self.ingest.ice_servers if authenticated or not s.credential
                ],
                "defaults": session_to_json(SessionSettings()),
                "limits": {
                    "max_prompt_chars": lim.max_prompt_chars,
                    "max_session_seconds": lim.max_session_seconds,
                    "inactivity_seconds": self.ingest.limits.inactivity_seconds,
                },
            }
        )

    async def offer(self, request: web.Request) -> web.Response:
        principal = self._require(request, STREAM)
        if request.content_type != "application/json":  # a cross-site form or text/plain POST
            return json_error(415, "the offer must be sent as Content-Type: application/json")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"the request body must be JSON: {e}") from e
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object {sdp, type, config}")
        sdp, kind = body.get("sdp"), body.get("type")
        if not isinstance(sdp, str) or not isinstance(kind, str):
            raise InvalidArgument("'sdp' and 'type' must be strings")
        settings = settings_from_json(body.get("config"))
        try:
            answer, answer_type, sid, secret = await asyncio.wait_for(
                self.ingest.offer(sdp, kind, settings, principal.tenant, request.remote or ""),
                START_TIMEOUT_S,
            )
        except TimeoutError as e:
            raise ResourceExhausted(f"the session could not be started within {START_TIMEOUT_S:.0f} s") from e
        return web.json_response(
            {"sdp": answer, "type": answer_type, "session_id": sid, "resume_secret": secret}
        )

    async def sessions(self, request: web.Request) -> web.Response:
        principal = self._require(request, MONITOR)
        data = await asyncio.get_running_loop().run_in_executor(None, self.reader.sessions, principal)
        return web.json_response(data, headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> list[Event]:
        """A session's events, for its owner, an admin, or whoever sends its secret
        (``X-Resume-Secret``)."""
        sid = request.match_info["sid"]
        principal, secret = request[PRINCIPAL], request.headers.get(SECRET_HEADER, "")

        def read() -> list[Event]:
            events = self.reader.all_events(sid)  # NOT_FOUND first: an unknown id is not a secret
            self.gateway.check_read(sid, principal, secret)
            return events

        return await asyncio.get_running_loop().run_in_executor(None, read)

    async def captions_vtt(self, request: web.Request) -> web.Response:
        events = await self._events(request)
        sid = request.match_info["sid"]
        return web.Response(
            text=to_webvtt(final_captions(events)),
            content_type="text/vtt",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{sid}.vtt"'},
        )

    async def captions_json(self, request: web.Request) -> web.Response:
        events = await self._events(request)
        sid = request.match_info["sid"]
        body = {
            "session_id": sid,
            "events": [ev.to_json() for ev in events],
            "finals": [{"start": c.start, "end": c.end, "text": c.text} for c in final_captions(events)],
        }
        return web.Response(
            text=json.dumps(body, ensure_ascii=False, indent=1),
            content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{sid}.json"'},
        )


@dataclass
class HttpServer:
    """A running web server: its port, loop and thread; ``stop()`` closes every peer first."""

    port: int
    ingest: WebRtcIngest
    loop: asyncio.AbstractEventLoop
    runner: web.AppRunner
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        if not self.thread.is_alive():
            return

        async def shutdown() -> None:
            await self.ingest.shutdown()
            await self.runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout)
        except Exception:
            log.exception("stopping the web server did not finish cleanly")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def start_http(
    gateway: LiveGateway,
    host: str,
    port: int,
    auth: Authenticator | None = None,
    ice_servers: Sequence[RTCIceServer] | None = None,
    limits: WebRtcLimits | None = None,
    tls: tuple[str, str] | None = None,
    allowed_hosts: Sequence[str] = (),
    redis_url: str = "",
) -> HttpServer:
    """Start the web server on its own loop and thread; returns once it listens. ``tls``
    (certificate, key): HTTPS. ``allowed_hosts``: Host names it answers to beside loopback
    (and the address it listens on). ``redis_url``: for the monitoring API's stores (default:
    the gateway's monitor's; without either those routes answer 503)."""
    ssl_context = None
    if tls is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(*tls)
    names = frozenset({*allowed_hosts, *([host] if host not in ("", "0.0.0.0", "::") else [])})
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            ingest = WebRtcIngest(gateway, ice_servers or (), limits)
            runner = web.AppRunner(HttpApp(gateway, ingest, auth, names, redis_url).build(), access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            loop.run_until_complete(site.start())
            started.update(ingest=ingest, runner=runner, port=runner.addresses[0][1])
        except BaseException as e:
            started["error"] = e
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="gateway-http", daemon=True)
    thread.start()
    if not ready.wait(30.0):
        raise TimeoutError("the web server did not start within 30 s")
    if "error" in started:
        raise started["error"]
    log.info("web page on %s://%s:%d/", "https" if tls else "http", host, started["port"])
    return HttpServer(started["port"], started["ingest"], loop, started["runner"], thread)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"--http must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)  # ":8080" is loopback: say 0.0.0.0 to mean it
