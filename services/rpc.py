"""gRPC plumbing shared by the servers: error mapping, health, reflection, server construction.

Domain code raises the named exceptions of :mod:`services.errors`; this is the one place that
maps them to status codes. Anything else is INTERNAL and logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services import errors
from services.security import INSECURE, ClientCredentials, wrap_handler

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

REDIS_DOWN: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
REDIS_UNAVAILABLE = "Redis is unreachable; try again shortly"
"""The details of UNAVAILABLE for a Redis outage (its address and error go to the log only)."""
STATUS_FOR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    *((cls, grpc.StatusCode.UNAVAILABLE) for cls in REDIS_DOWN),  # transient: a client retries
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.MidashengError, grpc.StatusCode.FAILED_PRECONDITION),
)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
RETRY_AFTER_MS = "retry-after-ms"  # trailer of a RESOURCE_EXHAUSTED answer: when to try again


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_FOR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if context.code() is not None:
        raise exc  # context.abort() already chose the status (and raised a bare Exception)
    if isinstance(exc, grpc.Call):  # a call to another service failed: pass its status on
        code = exc.code()
        log.warning("%s: a call to another service failed: %s: %s", method, code.name, exc.details())
        context.abort(code, exc.details() or code.name)
    if isinstance(exc, REDIS_DOWN):
        log.warning("%s: Redis is unreachable: %s", method, exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, REDIS_UNAVAILABLE)
    code = status_for(exc)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        context.set_trailing_metadata(((RETRY_AFTER_MS, str(int(retry_after * 1000))),))
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", method)
        context.abort(code, f"internal error ({type(exc).__name__}); see the server log")
    context.abort(code, str(exc))


def _is_cancellation(exc: Exception) -> bool:
    """The request iterator of a cancelled call raises a bare RpcError (no status of its own)."""
    return isinstance(exc, grpc.RpcError) and not isinstance(exc, (grpc.Call, errors.MidashengError))


def unary(fn: F) -> F:
    """Map named exceptions of a unary RPC method to gRPC statuses."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            if _is_cancellation(exc):
                raise
            _abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    """Same as :func:`unary` for response-streaming methods (generators)."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            if _is_cancellation(exc):
                raise
            _abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


def make_server(
    max_workers: int = 32,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    maximum_concurrent_rpcs: int | None = None,
) -> grpc.Server:
    """A server with the project's message limits. ``interceptors`` run before every handler (the
    auth interceptor of :mod:`services.security`); beyond ``maximum_concurrent_rpcs`` calls gRPC
    answers RESOURCE_EXHAUSTED at once instead of queueing them without bound."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


def internal_channel(target: str, credentials: ClientCredentials = INSECURE) -> grpc.Channel:
    """A channel between this project's services: large messages, and a reconnect backoff capped at
    a few seconds so that a restarted service is reached again promptly (gRPC's default grows to
    two minutes). ``credentials``: TLS (mutual with a client certificate) and the service token."""
    return credentials.channel(
        target,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 3000),
        ],
    )


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register grpc.health.v1 (every service SERVING) and server reflection."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(service_names)
    for name in [*names, ""]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on ``address`` (TLS with ``credentials``, else plaintext); returns the port (0 picks
    a free one)."""
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise errors.MidashengError(f"cannot listen on {address}")
    return port


def wait_healthy(
    target: str, service: str = "", timeout: float = 30.0, credentials: ClientCredentials = INSECURE
) -> bool:
    """Poll grpc.health.v1 Check until SERVING or the timeout."""
    import time

    deadline = time.monotonic() + timeout
    with credentials.channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return False


class ConcurrencyLimit(grpc.ServerInterceptor):
    """Calls in flight per group of methods (``groups``: full method name -> group; methods in no
    group share ``other``): a call beyond its group's limit is refused at once with
    RESOURCE_EXHAUSTED and a retry hint, so no group can take every thread of the server (health
    checks, outside every group, always find one). A slot is held until the call terminates."""

    def __init__(
        self,
        limits: dict[str, int],
        groups: dict[str, str],
        retry_after: float = 5.0,
        unlimited: Iterable[str] = ("/grpc.health.v1.Health/Check",),
    ) -> None:
        self.groups = groups
        self.unlimited = frozenset(unlimited)
        self.retry_after = retry_after
        self._free = dict(limits)
        self._limits = dict(limits)
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method in self.unlimited:
            return handler
        group = self.groups.get(details.method, "other")
        if group not in self._free:
            return handler

        def take(context: grpc.ServicerContext) -> None:
            with self._lock:
                ok = self._free[group] > 0
                if ok:
                    self._free[group] -= 1
            if not ok:
                context.set_trailing_metadata(((RETRY_AFTER_MS, str(int(self.retry_after * 1000))),))
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server is at its limit of {self._limits[group]} {group} calls; "
                    f"retry in {self.retry_after:.0f} s",
                )
            if not context.add_callback(lambda: self._give_back(group)):
                self._give_back(group)  # the call already ended

        return wrap_handler(handler, take)

    def _give_back(self, group: str) -> None:
        with self._lock:
            self._free[group] += 1

    def in_use(self, group: str) -> int:
        with self._lock:
            return self._limits[group] - self._free[group]
