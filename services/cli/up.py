"""``midasheng up``: the whole stack on one machine, one log stream, clean shutdown on Ctrl-C.

Starts (as child processes) a private redis-server when no ``REDIS_URL`` is given, the encoder
service, the LM service with its live worker(s), and the gateway; waits for each to answer its
gRPC health check; prefixes every child's log lines with its name. With ``--encoder-backend
triton`` it first writes a model repository for the checkpoint's encoder into a temporary
directory and starts a local ``tritonserver`` on it (from the Triton environment, see
``deploy/triton/README.md``), which the encoder then uses.

Security: the encoder and LM always listen on 127.0.0.1 and require a random service token that
only the children know (``$MIDASHENG_SERVICE_TOKEN``); the private Redis gets a random password;
Redis URLs reach the children through the environment, never argv, and are printed masked.
``--host`` (the gateway and the page) beyond loopback is refused unless the gateway has TLS and
API keys (``--tls-cert``/``--tls-key``, ``--api-keys-file``) or ``--allow-insecure-host`` is given.

Supervision: a child that exits is restarted after a backoff (1 s, doubling, at most 30 s) and the
restart is logged; one that exits more than ``--max-restarts`` times within ``--restart-window-s``
stops the whole stack with the reason (exit code 1).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import redis as redis_lib

from lm_service.engines import DEFAULT_ENGINE, ENGINES
from services import config
from services.cli.common import API_KEYS_ENV
from services.cli.gateway import TOKEN_ENV
from services.errors import MidashengError
from services.pb.midasheng.v1 import captions_pb2, encoder_pb2, lm_pb2
from services.rpc import wait_healthy
from services.security import SERVICE_TOKEN_ENV, SecurityError, is_loopback, mask_url
from services.transport.keys import TransportDefaults
from services.transport.redis_server import PrivateRedis, free_port, start_private_redis

if TYPE_CHECKING:
    from encoder_service.backends.triton_local import LocalTriton

ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
LM_SERVICE = lm_pb2.DESCRIPTOR.services_by_name["LMService"].full_name
GATEWAY_SERVICE = captions_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
READY_MARK = " ready on port "  # what every service prints once it serves ("gateway ready on port N")
MAX_BACKOFF_S = 30.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    thread: threading.Thread | None = None
    ready: threading.Event = field(default_factory=threading.Event)  # printed its READY_MARK line
    exits: list[float] = field(default_factory=list)  # monotonic times it exited unasked
    restart_at: float | None = None  # when a restart is due
    restarts: int = 0


@dataclass(frozen=True)
class RestartPolicy:
    """How ``up`` supervises its children."""

    max_restarts: int = 5  # restarts of one child within window_s; one more exit stops the stack
    window_s: float = 300.0
    backoff_s: float = 1.0  # first delay; doubles with each exit in the window, at most MAX_BACKOFF_S


@dataclass
class Stack:
    """Handles to every process of a running local stack."""

    redis_url: str = field(repr=False)  # may hold a password: print redis_url_masked
    gateway: str
    encoder: str
    lm: str
    http: str | None = None
    children: list[Child] = field(default_factory=list)
    out: object = None  # where the children's lines go
    redis: PrivateRedis | None = None
    triton: LocalTriton | None = None  # with --encoder-backend triton
    triton_repo: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def redis_url_masked(self) -> str:
        return mask_url(self.redis_url)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(timeout=5)
        for child in self.children:
            if child.thread is not None:
                child.thread.join(timeout=2)
        if self.triton is not None:
            self.triton.stop()
        if self.triton_repo is not None:
            shutil.rmtree(self.triton_repo, ignore_errors=True)
        if self.redis is not None:
            self.redis.stop()


def _pipe(child: Child, process: subprocess.Popen[str], out: object, lock: threading.Lock) -> None:
    assert process.stdout is not None
    with process.stdout:  # closed at the end of the child's output
        for line in process.stdout:
            if READY_MARK in line:
                child.ready.set()
            with lock:
                print(f"[{child.name}] {line.rstrip()}", file=out, flush=True)  # type: ignore[call-overload]


def _start(stack: Stack, child: Child) -> None:
    """(Re)start ``child``'s process with its arguments and environment; pipe its lines."""
    child.ready.clear()
    child.process = subprocess.Popen(
        [sys.executable, "-m", "services", *child.args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child.env,
        start_new_session=True,
    )
    child.thread = threading.Thread(
        target=_pipe,
        args=(child, child.process, stack.out, stack._lock),
        name=f"log-{child.name}",
        daemon=True,
    )
    child.thread.start()


def _spawn(
    stack: Stack, name: str, args: list[str], out: object, env_extra: dict[str, str] | None = None
) -> Child:
    stack.out = out
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    child = Child(name, None, list(args), env)  # type: ignore[arg-type]
    _start(stack, child)
    stack.children.append(child)
    return child


def _ready(stack: Stack, child: Child, target: str, service: str, by_line: bool = False) -> None:
    """Wait until ``child`` answers its health check or, with ``by_line`` (a TLS gateway whose
    certificate this process need not be able to verify), until it printed that it serves."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise MidashengError(f"{child.name} exited with code {child.process.returncode} while starting")
        if by_line:
            if child.ready.wait(1.0):
                return
        elif wait_healthy(target, service, timeout=1.0):
            return
    raise MidashengError(f"{child.name} did not become healthy within {READY_TIMEOUT_S:.0f} s")


def supervise(stack: Stack, policy: RestartPolicy, now: float | None = None) -> str | None:
    """One round of supervision: restart children whose backoff is over, schedule a restart for
    those that exited; returns why the stack must stop (None = keep going)."""
    now = time.monotonic() if now is None else now
    if stack.redis is not None and stack.redis.process.poll() is not None:
        return f"the private redis-server exited with code {stack.redis.process.returncode}; its data is gone"
    for child in stack.children:
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                _say(stack, f"restarting {child.name} (restart {child.restarts})")
                _start(stack, child)
            continue
        code = child.process.poll()
        if code is None:
            continue
        child.exits = [t for t in child.exits if now - t < policy.window_s] + [now]
        if len(child.exits) > policy.max_restarts:
            return (
                f"{child.name} exited with code {code}, {len(child.exits)} times within "
                f"{policy.window_s:.0f} s (at most {policy.max_restarts} restarts); stopping"
            )
        delay = min(MAX_BACKOFF_S, policy.backoff_s * 2 ** (len(child.exits) - 1))
        child.restart_at = now + delay
        _say(stack, f"{child.name} exited with code {code}; restarting it in {delay:.1f} s")
    return None


def _say(stack: Stack, message: str) -> None:
    with stack._lock:
        print(f"midasheng up: {message}", file=stack.out or sys.stderr, flush=True)  # type: ignore[arg-type]


def check_exposure(host: str, tls: bool, auth: bool, allow_insecure: bool, out: object = sys.stderr) -> None:
    """Refuse (or, with ``allow_insecure``, loudly warn about) a gateway beyond loopback that has
    no TLS or no client authentication."""
    if is_loopback(host):
        return
    missing = [
        what
        for what, ok in (("TLS (--tls-cert/--tls-key)", tls), ("API keys (--api-keys-file)", auth))
        if not ok
    ]
    if not missing:
        return
    message = f"the gateway would listen on {host} without {' and without '.join(missing)}"
    if not allow_insecure:
        raise SecurityError(
            f"{message}: anyone who reaches it could use it. Configure them, bind 127.0.0.1, or pass "
            "--allow-insecure-host to accept the risk."
        )
    print(
        f"midasheng up: WARNING: {message} (--allow-insecure-host): anyone who reaches it can use it",
        file=out,
        flush=True,
    )  # type: ignore[call-overload]


def protect_private_redis(server: PrivateRedis) -> str:
    """Give a private redis-server a random password (set over its loopback port right after it
    started; never on a command line); returns the URL that carries it."""
    password = secrets.token_urlsafe(24)
    client = redis_lib.Redis(
        host="127.0.0.1", port=server.port, socket_timeout=5.0, socket_connect_timeout=5.0
    )
    try:
        client.config_set("requirepass", password)
    finally:
        client.close()
    return f"redis://:{password}@127.0.0.1:{server.port}/0"


def _start_triton(stack: Stack, model: str | None, device: str, out: object, triton_env: str | None) -> str:
    """A local tritonserver serving the checkpoint's encoder; returns its gRPC address."""
    from encoder_service.backends.triton_local import find_install, start_local_triton
    from encoder_service.backends.triton_repo import RepoOptions, write_repository
    from services.model.loading import pick_device

    install = find_install(triton_env)  # before anything is written: says how to create it
    stack.triton_repo = Path(tempfile.mkdtemp(prefix="midasheng-triton-repo-"))
    kind = "gpu" if pick_device(device).type == "cuda" else "cpu"
    write_repository(model, stack.triton_repo, RepoOptions(kind=kind))

    def log(line: str) -> None:
        with stack._lock:
            print(f"[triton] {line}", file=out, flush=True)  # type: ignore[call-overload]

    stack.triton = start_local_triton(stack.triton_repo, install, metrics_port=free_port(), output=log)
    return stack.triton.url


def start_stack(
    model: str | None = None,
    redis_url: str | None = None,
    host: str = "127.0.0.1",
    gateway_port: int = 50051,
    http_port: int | None = None,
    lm_workers: int = 1,
    lm_processes: int = 1,
    device: str = "auto",
    out: object = sys.stderr,
    extra_gateway_args: list[str] | None = None,
    defaults: TransportDefaults | None = None,
    engine: str = DEFAULT_ENGINE,
    encoder_backend: str = "torch",
    triton_env: str | None = None,
    tls: tuple[str, str] | None = None,
    api_keys_file: str | None = None,
    allow_insecure_host: bool = False,
    redis_dir: str | None = None,
) -> Stack:
    """Start everything and return once every service answers its health check. ``defaults``
    reach every child through the environment (they must agree across processes).
    ``encoder_backend="triton"`` also starts a local Triton for the encoder (``triton_env``: the
    Triton environment, default ``.venv-triton`` or ``$MIDASHENG_TRITON_ENV``).

    Only the gateway (and the page) listen on ``host``; the encoder and LM listen on 127.0.0.1
    and require a service token made here. ``tls`` (certificate, key) and ``api_keys_file``
    protect the gateway; beyond loopback they are required unless ``allow_insecure_host``.
    ``redis_dir``: the private Redis keeps its data there (append-only file) across restarts."""
    auth = bool(api_keys_file or os.environ.get(TOKEN_ENV))
    check_exposure(host, tls is not None, auth, allow_insecure_host, out)
    redis = None
    if not redis_url:
        redis = (
            start_private_redis(workdir=Path(redis_dir), persist=True) if redis_dir else start_private_redis()
        )
        try:
            redis_url = protect_private_redis(redis)
        except BaseException:
            redis.stop()
            raise
    internal = "127.0.0.1"
    enc_port, lm_port = free_port(), free_port()
    gw_port = gateway_port or free_port()
    stack = Stack(
        redis_url, f"{host}:{gw_port}", f"{internal}:{enc_port}", f"{internal}:{lm_port}", redis=redis
    )
    model_args = ["--model", model] if model else []
    env = config.to_env(defaults) if defaults is not None else {}
    env |= {"REDIS_URL": redis_url, SERVICE_TOKEN_ENV: secrets.token_urlsafe(32)}  # never argv
    service = {"redis": [], "device": ["--device", device, *model_args]}
    public = ["--tls-cert", tls[0], "--tls-key", tls[1]] if tls else []
    public += ["--api-keys-file", api_keys_file] if api_keys_file else []
    try:
        enc_args = ["encoder", "--listen", stack.encoder, *service["redis"], *service["device"]]
        if encoder_backend == "triton":
            enc_args += [
                "--backend",
                "triton",
                "--triton-url",
                _start_triton(stack, model, device, out, triton_env),
            ]
        enc = _spawn(stack, "encoder", enc_args, out, env)
        lms = []
        for i in range(lm_processes):
            target = stack.lm if i == 0 else f"{internal}:{free_port()}"
            args = ["lm", "--listen", target, *service["redis"], "--workers", str(lm_workers)]
            args += ["--worker-id", f"lm{i}", "--engine", engine, *service["device"]]
            lms.append((_spawn(stack, f"lm-{i}", args, out, env), target))
        gw_args = ["gateway", "--listen", stack.gateway, "--encoder", stack.encoder, "--lm", stack.lm]
        gw_args += [*service["redis"], *public, *(extra_gateway_args or [])]
        if http_port is not None:
            gw_args += ["--http", f"{host}:{http_port}"]
            stack.http = f"{'https' if tls else 'http'}://{host}:{http_port}/"
        gw = _spawn(stack, "gateway", gw_args, out, env)
        _ready(stack, enc, stack.encoder, ENCODER_SERVICE)
        for child, target in lms:
            _ready(stack, child, target, LM_SERVICE)
        _ready(stack, gw, stack.gateway, GATEWAY_SERVICE, by_line=tls is not None)
    except BaseException:
        stack.stop()
        raise
    return stack


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run the whole stack locally (redis, encoder, LM worker, gateway)",
        description="Start the whole captioning stack on this machine with one log stream. Without REDIS_URL a "
        "private redis-server is started on a free loopback port. Ctrl-C stops everything.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address every service listens on (default: 127.0.0.1)"
    )
    p.add_argument("--port", type=int, default=50051, help="gateway gRPC port (default: 50051)")
    p.add_argument(
        "--http-port", type=int, default=8080, help="web page and WebRTC port (default: 8080; 0 = off)"
    )
    p.add_argument("--lm-workers", type=int, default=1, help="live worker loops per LM process")
    p.add_argument("--lm-processes", type=int, default=1, help="LM processes (default: 1)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="use this Redis (default: $REDIS_URL)"
    )
    p.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        choices=ENGINES,
        help=f"caption engine (default: {DEFAULT_ENGINE})",
    )
    p.add_argument(
        "--encoder-backend",
        default="torch",
        choices=("torch", "triton"),
        help="torch: the encoder runs in the encoder process; triton: in a local tritonserver started "
        "for it (needs the Triton environment: bash deploy/triton/setup-env.sh)",
    )
    p.add_argument(
        "--triton-env",
        default=None,
        help="the Triton environment (default: $MIDASHENG_TRITON_ENV or .venv-triton in the project)",
    )
    p.add_argument(
        "--tls-cert", default=None, metavar="PATH", help="the gateway's TLS certificate chain (PEM)"
    )
    p.add_argument("--tls-key", default=None, metavar="PATH", help="the gateway's TLS private key (PEM)")
    p.add_argument(
        "--api-keys-file",
        default=os.environ.get(API_KEYS_ENV) or None,
        metavar="PATH",
        help=f"API keys the gateway accepts (see `midasheng keys`; default: ${API_KEYS_ENV})",
    )
    p.add_argument(
        "--allow-insecure-host",
        action="store_true",
        help="let --host be a non-loopback address without TLS or API keys (anyone who reaches it can use it)",
    )
    p.add_argument(
        "--redis-persist",
        default=None,
        metavar="DIR",
        help="keep the private Redis's data in DIR (append-only file): sessions, captions and jobs "
        "survive a restart of up (default: kept in memory only)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=RestartPolicy.max_restarts,
        help="restarts of one child within --restart-window-s before the stack stops (default: %(default)s)",
    )
    p.add_argument(
        "--restart-window-s",
        type=float,
        default=RestartPolicy.window_s,
        help="see --max-restarts (default: %(default)s)",
    )
    p.add_argument(
        "--restart-backoff-s",
        type=float,
        default=RestartPolicy.backoff_s,
        help="first restart delay, doubling up to 30 s (default: %(default)s)",
    )
    p.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)
    config.add_flags(p, TransportDefaults)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MidashengError("--tls-cert and --tls-key go together")
    policy = RestartPolicy(args.max_restarts, args.restart_window_s, args.restart_backoff_s)
    stack = start_stack(
        args.model,
        args.redis_url,
        args.host,
        args.port,
        args.http_port or None,
        args.lm_workers,
        args.lm_processes,
        args.device,
        defaults=config.from_args(TransportDefaults, args),
        engine=args.engine,
        encoder_backend=args.encoder_backend,
        triton_env=args.triton_env,
        tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
        api_keys_file=args.api_keys_file,
        allow_insecure_host=args.allow_insecure_host,
        redis_dir=args.redis_persist,
    )
    lines = [f"midasheng is up: gRPC gateway at {stack.gateway}"]
    if stack.http:
        lines.append(f"  web page:  {stack.http}")
    if stack.triton is not None:
        t = stack.triton
        lines.append(f"  triton (encoder): grpc {t.url}, metrics http://{t.host}:{t.metrics_port}/metrics")
    lines.append(f"  stream a file:  midasheng stream FILE --server {stack.gateway}")
    lines.append(f"  redis: {stack.redis_url_masked}  (Ctrl-C stops everything)")
    print("\n".join(lines), flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    deadline = time.monotonic() + args.exit_after if args.exit_after is not None else None
    code = 0
    try:
        while not done.wait(0.5):
            reason = supervise(stack, policy)
            if reason is not None:
                print(f"midasheng up: {reason}", file=sys.stderr, flush=True)
                code = 1
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        stack.stop()
    print("midasheng up: stopped", flush=True)
    return code
