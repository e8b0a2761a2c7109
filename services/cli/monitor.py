"""``midasheng rules|search|alerts|clip|questions``: the gateway's monitoring API from the shell.

Each command calls the gateway's web server (``--url``, default ``http://127.0.0.1:8080``, what
``midasheng up`` serves) with the API key from ``--api-key-file`` or ``$MIDASHENG_API_KEY``; what
it sees and changes is the key's tenant's. Only the standard library (``urllib``) is used.

Exit codes: 0 done; 1 the gateway refused or failed (its message is printed); 2 bad arguments or
an unreadable file; 3 the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import ssl
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.errors import ConfigError, InvalidArgument
from services.security import API_KEY_ENV, read_secret

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "MIDASHENG_URL"
TIMEOUT_S = 30.0
KINDS = ("match", "answer_true", "changed", "silence")
HISTORY_KINDS = ("caption", "answer", "alert")
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CommandFailed(Exception):
    """Ends a command with a message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- talking to the gateway ----------------------------------------------------------------------


class Api:
    """The monitoring API of one gateway, over urllib."""

    def __init__(self, url: str, key: str | None, timeout: float = TIMEOUT_S, ca: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CommandFailed(
                f"--url must be the gateway's web address, http(s)://HOST:PORT, got {url!r}", EXIT_USAGE
            )
        self.base = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        try:
            self.context = ssl.create_default_context(cafile=ca) if ca else None
        except (OSError, ssl.SSLError) as e:
            raise CommandFailed(f"cannot use --tls-ca {ca}: {e}", EXIT_USAGE) from None

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, bytes]:
        """(status, content type, body) of a 2xx answer; CommandFailed for anything else."""
        url = self.base + path
        params = {k: str(v) for k, v in (query or {}).items() if v is not None and v != ""}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        if self.key:
            hdrs["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            with e:
                raise CommandFailed(_http_error(e.code, e.read(), self.key), EXIT_REFUSED) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise CommandFailed(
                f"cannot reach the gateway at {self.base}: {reason} (is it running? see --url)",
                EXIT_UNREACHABLE,
            ) from None

    def json(self, method: str, path: str, **kw: Any) -> Any:
        _status, _type, raw = self.call(method, path, **kw)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CommandFailed(
                f"the gateway at {self.base} answered {path} with something that is not JSON; "
                "is --url the gateway's web address?",
                EXIT_REFUSED,
            ) from None


def _http_error(status: int, raw: bytes, key: str | None) -> str:
    try:
        message = str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        message = raw.decode(errors="replace").strip()[:300] or "no message"
    hint = ""
    if status == 401:
        hint = (
            f" (pass an API key with --api-key-file or ${API_KEY_ENV})"
            if not key
            else " (the API key was not accepted)"
        )
    elif status == 404 and "Not Found" in message:
        hint = " (is --url the gateway's web address, and the gateway new enough?)"
    return f"HTTP {status}: {message}{hint}"


def _api(args: argparse.Namespace) -> Api:
    key: str | None = None
    if args.api_key_file:
        try:
            key = read_secret(args.api_key_file, "API key")
        except ConfigError as e:
            raise CommandFailed(str(e), EXIT_USAGE) from None
    key = key or os.environ.get(API_KEY_ENV) or None
    return Api(args.url, key, args.timeout, args.tls_ca)


# --- parsing -------------------------------------------------------------------------------------


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (local time when it names no zone) -> unix seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise argparse.ArgumentTypeError(f"{text!r} is not a time")
        return seconds
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither unix seconds nor an ISO 8601 time (e.g. 2024-06-01T12:00:00Z)"
        ) from None
    return when.timestamp()


def parse_question(text: str) -> dict[str, str]:
    qid, sep, question = text.partition("=")
    if not sep or not qid.strip() or not question.strip():
        raise argparse.ArgumentTypeError(
            f'a question is "ID=TEXT", e.g. "crying=Is a baby crying?"; got {text!r}'
        )
    return {"id": qid.strip(), "text": question.strip()}


def _when(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix).astimezone().isoformat(timespec="seconds")


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [list(header)] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    lines = []
    for r in cells:
        lines.append("  ".join([c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)] + [r[-1]]).rstrip())
    return "\n".join(lines)


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


# --- commands ------------------------------------------------------------------------------------


def rule_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the flags name (the others take the gateway's defaults)."""
    body: dict[str, Any] = {"kind": args.kind}
    optional = {
        "pattern": args.pattern,
        "source": args.source,
        "debounce_seconds": args.debounce,
        "cooldown_seconds": args.cooldown,
        "silence_seconds": args.silence_seconds,
        "silence_dbfs": args.silence_dbfs,
        "webhook_url": args.webhook,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.regex:
        body["regex"] = True
    if args.finals_only:
        body["finals_only"] = True
    if args.disabled:
        body["enabled"] = False
    if args.streams:
        body["streams"] = [s.strip() for item in args.streams for s in item.split(",") if s.strip()]
    return body


def _rule_row(r: dict[str, Any]) -> list[object]:
    what = r["pattern"] or ("" if r["source"] == "caption" else r["source"])
    if r["kind"] == "silence":
        what = f"< {r['silence_dbfs']:g} dBFS for {r['silence_seconds']:g} s"
    flags = ",".join(
        f
        for f, on in (("regex", r["regex"]), ("finals", r["finals_only"]), ("disabled", not r["enabled"]))
        if on
    )
    return [
        r["rule_id"],
        r["kind"],
        what,
        ",".join(r["streams"]) or "*",
        f"{r['debounce_seconds']:g}",
        f"{r['cooldown_seconds']:g}",
        flags,
        r["webhook_url"],
    ]


def run_rules(args: argparse.Namespace) -> int:
    api = _api(args)
    if args.action == "list":
        rules = api.json("GET", "/api/rules")["rules"]
        if args.format == "json":
            _out(json.dumps(rules, indent=1, ensure_ascii=False))
        elif rules:
            header = ["RULE", "KIND", "PATTERN/SOURCE", "STREAMS", "DEBOUNCE", "COOLDOWN", "FLAGS", "WEBHOOK"]
            _out(_table([_rule_row(r) for r in rules], header))
        else:
            print("no rules", file=sys.stderr)
    elif args.action == "put":
        path = "/api/rules/" + urllib.parse.quote(args.rule_id, safe="")
        got = api.json("PUT", path, body=rule_from_args(args))
        _out(json.dumps(got["rule"], ensure_ascii=False))
        print(f"rule {args.rule_id} saved (rules version {got['version']})", file=sys.stderr)
    elif args.action == "delete":
        api.call("DELETE", "/api/rules/" + urllib.parse.quote(args.rule_id, safe=""))
        print(f"rule {args.rule_id} deleted", file=sys.stderr)
    else:  # secret
        _out(api.json("GET", "/api/webhook-secret")["secret"])
    return 0


def run_search(args: argparse.Namespace) -> int:
    if args.format == "vtt" and not args.stream:
        raise CommandFailed("--format vtt needs --stream (a WebVTT file holds one stream)", EXIT_USAGE)
    api = _api(args)
    query = {
        "q": args.text,
        "stream": args.stream,
        "since": args.since,
        "until": args.until,
        "kind": ",".join(args.kind or []),
        "limit": args.limit,
        "before": args.before,
        "format": "vtt" if args.format == "vtt" else "json",
    }
    if args.format == "vtt":
        _out(api.call("GET", "/api/history", query=query)[2].decode())
        return 0
    page = api.json("GET", "/api/history", query=query)
    entries = page["entries"]
    if args.format == "json":
        _out(json.dumps(page, indent=1, ensure_ascii=False))
        return 0
    rows = []
    for e in entries:
        what = e["kind"]
        if e["kind"] == "answer":
            what = f"answer:{e['question_id']}"
        elif e["kind"] == "alert":
            what = f"alert:{e['rule_id']}"
        span = f"{e['window_start']:.1f}-{e['window_end']:.1f}"
        rows.append([_when(e["wall_time"]), e["stream"], span, what, e["text"]])
    if rows:
        _out(_table(rows, ["TIME", "STREAM", "STREAM S", "KIND", "TEXT"]))
    else:
        print("nothing found", file=sys.stderr)
    if page.get("before"):
        print(f"more: add --before {page['before']}", file=sys.stderr)
    return 0


def run_alerts(args: argparse.Namespace) -> int:
    api = _api(args)
    alerts = api.json("GET", "/api/alerts", query={"stream": args.stream, "limit": args.limit})["alerts"]
    if args.format == "json":
        _out(json.dumps(alerts, indent=1, ensure_ascii=False))
    elif alerts:
        rows = [
            [
                a["alert_id"],
                _when(a["wall_time"]),
                a["stream"],
                a["rule_id"],
                "yes" if a["has_clip"] else "no",
                a["text"],
            ]
            for a in alerts
        ]
        _out(_table(rows, ["ALERT", "TIME", "STREAM", "RULE", "CLIP", "TEXT"]))
    else:
        print("no alerts", file=sys.stderr)
    return 0


def run_clip(args: argparse.Namespace) -> int:
    api = _api(args)
    path = f"/api/alerts/{urllib.parse.quote(args.alert_id, safe='')}/clip.wav"
    _status, kind, wav = api.call("GET", path, headers={"Accept": "audio/wav"})
    if not kind.startswith("audio/"):
        raise CommandFailed(
            f"the gateway answered with {kind or 'no content type'}, not a WAV file", EXIT_REFUSED
        )
    try:
        with wave.open(io.BytesIO(wav)) as w:
            seconds = w.getnframes() / w.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError) as e:
        raise CommandFailed(f"the clip is not a readable WAV file: {e}", EXIT_REFUSED) from None
    if args.output == "-":
        sys.stdout.buffer.write(wav)
        sys.stdout.buffer.flush()
    else:
        try:
            Path(args.output).write_bytes(wav)
        except OSError as e:
            raise CommandFailed(f"cannot write {args.output}: {e.strerror}", EXIT_USAGE) from None
        print(f"wrote {args.output} ({seconds:.2f} s, {len(wav)} bytes)", file=sys.stderr)
    return 0


def run_questions(args: argparse.Namespace) -> int:
    if not args.questions and not args.clear:
        raise CommandFailed('name the questions ("ID=TEXT" ...) or pass --clear to remove them', EXIT_USAGE)
    if args.questions and args.clear:
        raise CommandFailed("--clear takes no questions", EXIT_USAGE)
    api = _api(args)
    headers = {}
    if args.secret_file:
        try:
            headers["X-Resume-Secret"] = read_secret(args.secret_file, "resume secret")
        except ConfigError as e:
            raise CommandFailed(str(e), EXIT_USAGE) from None
    path = f"/api/sessions/{urllib.parse.quote(args.session_id, safe='')}/questions"
    got = api.json("PUT", path, body={"questions": args.questions or []}, headers=headers)
    for q in got["questions"]:
        _out(f"{q['id']}={q['text']}")
    if not got["questions"]:
        print(f"session {args.session_id} has no questions now", file=sys.stderr)
    return 0


def _guarded(fn: Any) -> Any:
    """Turns CommandFailed (and a bad argument found late) into a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except CommandFailed as e:
            print(f"midasheng {args.command}: error: {e}", file=sys.stderr)
            return e.code
        except InvalidArgument as e:
            print(f"midasheng {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except (KeyError, TypeError) as e:  # a 2xx answer without the fields this version expects
            print(
                f"midasheng {args.command}: error: the gateway's answer lacks {e}; is --url a gateway "
                "of this version?",
                file=sys.stderr,
            )
            return EXIT_REFUSED

    return run


# --- the parsers ---------------------------------------------------------------------------------


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"the gateway's web address (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    g.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help=f"file holding the API key (default: ${API_KEY_ENV}; none on an open gateway)",
    )
    g.add_argument(
        "--tls-ca", default=None, metavar="PATH", help="PEM CA bundle that signed an https:// gateway"
    )
    g.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help=f"seconds per request (default {TIMEOUT_S:g})"
    )


def _fill(text: str) -> str:
    return textwrap.fill(text, 88, break_on_hyphens=False)


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    def describe(text: str) -> str:
        tail = (
            f"The API key (--api-key-file or ${API_KEY_ENV}) needs the monitor scope; what the commands "
            "see and change is the key's tenant's. Exit codes: 0 done, 1 the gateway refused, 2 bad "
            "arguments, 3 the gateway could not be reached."
        )
        return _fill(text) + "\n\n" + _fill(tail)

    # rules
    p = sub.add_parser(
        "rules",
        help="list, add or change, and delete monitoring rules",
        description=describe(
            "Monitoring rules of your tenant (docs/monitoring.md). A rule raises an alert when "
            "a caption or answer matches, a question is answered yes, the scene changes, or the audio "
            "goes silent."
        ),
        formatter_class=fmt,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    ls = actions.add_parser("list", help="the tenant's rules")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    put = actions.add_parser(
        "put",
        help="add a rule, or replace the rule of that id",
        description=_fill(
            "Add a rule or replace the rule of that id (fields not given take their defaults: "
            "every stream, interims count, no debounce, 60 s cooldown, enabled)."
        ),
        epilog='examples:\n  midasheng rules put glass --kind match --pattern glass --streams "door-*"\n'
        "  midasheng rules put baby --kind answer_true --source is-baby-crying --debounce 4\n"
        "  midasheng rules put dead-air --kind silence --silence-seconds 20 --silence-dbfs -55",
        formatter_class=fmt,
    )
    put.add_argument("rule_id", metavar="RULE_ID", help="letters, digits, '.', '_' or '-' (1 to 64)")
    put.add_argument("--kind", required=True, choices=KINDS, help="what the rule watches for")
    put.add_argument("--pattern", default=None, help="match: a keyword (or a regex with --regex)")
    put.add_argument("--regex", action="store_true", help="match: --pattern is a regular expression")
    put.add_argument(
        "--source", default=None, help='"caption" (default) or a question id (answer_true needs one)'
    )
    put.add_argument(
        "--debounce", type=float, default=None, metavar="S", help="stream seconds the condition must hold"
    )
    put.add_argument(
        "--cooldown",
        type=float,
        default=None,
        metavar="S",
        help="stream seconds between firings (default 60)",
    )
    put.add_argument("--webhook", default=None, metavar="URL", help="http(s) URL each alert is POSTed to")
    put.add_argument("--finals-only", action="store_true", help="only final captions/answers count")
    put.add_argument(
        "--streams",
        action="append",
        default=None,
        metavar="IDS",
        help="session ids or globs (* ?), comma-separated, repeatable (default: every stream)",
    )
    put.add_argument(
        "--silence-seconds", type=float, default=None, metavar="S", help="silence: seconds (default 10)"
    )
    put.add_argument(
        "--silence-dbfs",
        type=float,
        default=None,
        metavar="D",
        help="silence: RMS level under which it is quiet (default -50)",
    )
    put.add_argument("--disabled", action="store_true", help="keep the rule but do not evaluate it")
    rm = actions.add_parser("delete", help="delete a rule")
    rm.add_argument("rule_id", metavar="RULE_ID")
    sec = actions.add_parser(
        "secret", help="print the key that signs the tenant's webhooks (made on first use)"
    )
    for each in (ls, put, rm, sec):
        _connection_flags(each)
    p.set_defaults(func=_guarded(run_rules))

    # search
    s = sub.add_parser(
        "search",
        help="search the history of captions, answers and alerts",
        description=describe(
            "Search your tenant's history, newest first: every word of TEXT must occur (case-insensitive)."
        ),
        epilog="examples:\n  midasheng search glass --since 2024-06-01T00:00 --kind caption\n"
        "  midasheng search --stream door-1 --format vtt > door-1.vtt",
        formatter_class=fmt,
    )
    s.add_argument("text", nargs="?", default="", metavar="TEXT", help="words to find (default: everything)")
    s.add_argument("--stream", default="", help="one stream (session id)")
    s.add_argument("--since", type=parse_time, default=None, metavar="T", help="unix seconds or ISO 8601")
    s.add_argument("--until", type=parse_time, default=None, metavar="T", help="unix seconds or ISO 8601")
    s.add_argument(
        "--kind", action="append", choices=HISTORY_KINDS, help="caption, answer or alert (repeatable)"
    )
    s.add_argument(
        "--limit", type=int, default=50, metavar="N", help="entries at most (default 50, at most 1000)"
    )
    s.add_argument("--before", default=None, metavar="CURSOR", help="go on from where a search stopped")
    s.add_argument("--format", choices=("table", "json", "vtt"), default="table", help="vtt needs --stream")
    _connection_flags(s)
    s.set_defaults(func=_guarded(run_search))

    # alerts
    a = sub.add_parser(
        "alerts",
        help="the newest alerts",
        description=describe("Your tenant's newest alerts."),
        formatter_class=fmt,
    )
    a.add_argument("--stream", default="", help="one stream (session id)")
    a.add_argument(
        "--limit", type=int, default=20, metavar="N", help="alerts at most (default 20, at most 500)"
    )
    a.add_argument("--format", choices=("table", "json"), default="table")
    _connection_flags(a)
    a.set_defaults(func=_guarded(run_alerts))

    # clip
    c = sub.add_parser(
        "clip",
        help="download an alert's audio clip",
        description=describe("Download the audio an alert fired on, as a 16 kHz mono WAV file."),
        formatter_class=fmt,
    )
    c.add_argument("alert_id", metavar="ALERT_ID")
    c.add_argument("-o", "--output", required=True, metavar="FILE.wav", help="where to write it (- = stdout)")
    _connection_flags(c)
    c.set_defaults(func=_guarded(run_clip))

    # questions
    q = sub.add_parser(
        "questions",
        help="change a live session's questions",
        description=describe(
            "Replace the questions a live session answers with every caption update. Needs "
            "the session's tenant, admin, or its resume secret (--secret-file)."
        ),
        epilog='example:\n  midasheng questions 3f2a... "crying=Is a baby crying?" "dog=Is a dog barking?"',
        formatter_class=fmt,
    )
    q.add_argument("session_id", metavar="SESSION_ID")
    q.add_argument("questions", nargs="*", type=parse_question, metavar="ID=TEXT", help="the new questions")
    q.add_argument("--clear", action="store_true", help="remove every question")
    q.add_argument(
        "--secret-file", default=None, metavar="F", help="file holding the session's resume secret"
    )
    _connection_flags(q)
    q.set_defaults(func=_guarded(run_questions))
