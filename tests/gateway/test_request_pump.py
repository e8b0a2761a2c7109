"""The gateway's request reader tells a half-close from a cancellation that grpc reports as an
ordinary end of messages (the race that once made a dropped client's session unresumable)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from services.gateway import grpc_api


def _drain(inbox: queue.Queue[object]) -> list[object]:
    out = []
    while True:
        item = inbox.get(timeout=5)
        out.append(item)
        if item is grpc_api._END or item is grpc_api._DROPPED or isinstance(item, BaseException):
            return out


def test_end_of_messages_without_termination_is_a_half_close() -> None:
    inbox: queue.Queue[object] = queue.Queue(maxsize=8)
    wake = threading.Event()
    grpc_api._pump(iter(["a", "b"]), inbox, threading.Event(), wake)
    assert _drain(inbox) == ["a", "b", grpc_api._END]
    assert wake.is_set()  # the relay loop is woken for what the client sent


def test_end_of_messages_followed_by_termination_is_a_dropped_connection() -> None:
    inbox: queue.Queue[object] = queue.Queue(maxsize=8)
    terminated = threading.Event()

    def messages() -> Iterator[str]:
        yield "a"
        # grpc: the empty read completes, the cancellation lands a moment later
        threading.Timer(0.05, terminated.set).start()

    grpc_api._pump(messages(), inbox, terminated, threading.Event())
    assert _drain(inbox) == ["a", grpc_api._DROPPED]


def test_half_close_is_reported_within_the_grace() -> None:
    inbox: queue.Queue[object] = queue.Queue(maxsize=8)
    t0 = time.monotonic()
    grpc_api._pump(iter([]), inbox, threading.Event(), threading.Event())
    assert inbox.get_nowait() is grpc_api._END
    assert time.monotonic() - t0 < grpc_api.HALF_CLOSE_GRACE_S + 1.0
