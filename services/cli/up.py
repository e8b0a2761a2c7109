"""``midasheng up``: the whole stack on one machine, one log stream, clean shutdown on Ctrl-C.

Starts (as child processes) a private redis-server when no ``REDIS_URL`` is given, the encoder
service, the LM service with its live worker(s), and the gateway; waits for each to answer its
gRPC health check; prefixes every child's log lines with its name. With ``--encoder-backend
triton`` it first writes a model repository for the checkpoint's encoder into a temporary
directory and starts a local ``tritonserver`` on it (from the Triton environment, see
``deploy/triton/README.md``), which the encoder then uses.
"""

from __future__ import annotations

import argparse
import os
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

from lm_service.engines import DEFAULT_ENGINE, ENGINES
from services import config
from services.errors import MidashengError
from services.pb.midasheng.v1 import captions_pb2, encoder_pb2, lm_pb2
from services.rpc import wait_healthy
from services.transport.keys import TransportDefaults
from services.transport.redis_server import PrivateRedis, free_port, start_private_redis

if TYPE_CHECKING:
    from encoder_service.backends.triton_local import LocalTriton

ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
LM_SERVICE = lm_pb2.DESCRIPTOR.services_by_name["LMService"].full_name
GATEWAY_SERVICE = captions_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    thread: threading.Thread | None = None


@dataclass
class Stack:
    """Handles to every process of a running local stack."""

    redis_url: str
    gateway: str
    encoder: str
    lm: str
    http: str | None = None
    children: list[Child] = field(default_factory=list)
    redis: PrivateRedis | None = None
    triton: LocalTriton | None = None  # with --encoder-backend triton
    triton_repo: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

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


def _pipe(child: Child, out: object, lock: threading.Lock) -> None:
    assert child.process.stdout is not None
    with child.process.stdout:  # closed at the end of the child's output
        for line in child.process.stdout:
            with lock:
                print(f"[{child.name}] {line.rstrip()}", file=out, flush=True)  # type: ignore[call-overload]


def _spawn(
    stack: Stack, name: str, args: list[str], out: object, env_extra: dict[str, str] | None = None
) -> Child:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    child = Child(name, proc)
    child.thread = threading.Thread(
        target=_pipe, args=(child, out, stack._lock), name=f"log-{name}", daemon=True
    )
    child.thread.start()
    stack.children.append(child)
    return child


def _ready(stack: Stack, child: Child, target: str, service: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise MidashengError(f"{child.name} exited with code {child.process.returncode} while starting")
        if wait_healthy(target, service, timeout=1.0):
            return
    raise MidashengError(f"{child.name} did not become healthy within {READY_TIMEOUT_S:.0f} s")


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
) -> Stack:
    """Start everything and return once every service answers its health check. ``defaults``
    reach every child through the environment (they must agree across processes).
    ``encoder_backend="triton"`` also starts a local Triton for the encoder (``triton_env``: the
    Triton environment, default ``.venv-triton`` or ``$MIDASHENG_TRITON_ENV``)."""
    redis = None
    if not redis_url:
        redis = start_private_redis()
        redis_url = redis.url
    enc_port, lm_port = free_port(), free_port()
    gw_port = gateway_port or free_port()
    stack = Stack(redis_url, f"{host}:{gw_port}", f"{host}:{enc_port}", f"{host}:{lm_port}", redis=redis)
    model_args = ["--model", model] if model else []
    env = config.to_env(defaults) if defaults is not None else {}
    service = {"redis": ["--redis-url", redis_url], "device": ["--device", device, *model_args]}
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
            target = stack.lm if i == 0 else f"{host}:{free_port()}"
            args = ["lm", "--listen", target, *service["redis"], "--workers", str(lm_workers)]
            args += ["--worker-id", f"lm{i}", "--engine", engine, *service["device"]]
            lms.append((_spawn(stack, f"lm-{i}", args, out, env), target))
        gw_args = ["gateway", "--listen", stack.gateway, "--encoder", stack.encoder, "--lm", stack.lm]
        gw_args += [*service["redis"], *(extra_gateway_args or [])]
        if http_port is not None:
            gw_args += ["--http", f"{host}:{http_port}"]
            stack.http = f"http://{host}:{http_port}/"
        gw = _spawn(stack, "gateway", gw_args, out, env)
        _ready(stack, enc, stack.encoder, ENCODER_SERVICE)
        for child, target in lms:
            _ready(stack, child, target, LM_SERVICE)
        _ready(stack, gw, stack.gateway, GATEWAY_SERVICE)
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
    p.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)
    config.add_flags(p, TransportDefaults)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    )
    lines = [f"midasheng is up: gRPC gateway at {stack.gateway}"]
    if stack.http:
        lines.append(f"  web page:  {stack.http}")
    if stack.triton is not None:
        t = stack.triton
        lines.append(f"  triton (encoder): grpc {t.url}, metrics http://{t.host}:{t.metrics_port}/metrics")
    lines.append(f"  stream a file:  midasheng stream FILE --server {stack.gateway}")
    lines.append(f"  redis: {stack.redis_url}  (Ctrl-C stops everything)")
    print("\n".join(lines), flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    deadline = time.monotonic() + args.exit_after if args.exit_after is not None else None
    try:
        while not done.wait(0.5):
            dead = [c for c in stack.children if c.process.poll() is not None]
            if dead:
                print(
                    f"midasheng up: {dead[0].name} exited with code {dead[0].process.returncode}; stopping",
                    file=sys.stderr,
                    flush=True,
                )
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        stack.stop()
    print("midasheng up: stopped", flush=True)
    return 0
