"""Graceful termination hands sessions over (what a rolling upgrade or a scale-down relies on):
an LM service stopped cleanly (SIGTERM) releases its leases, so another worker carries its
sessions on at once instead of after the lease TTL; a gateway that stops drains: new streams are
refused at once, open ones get ``drain_seconds`` to finish."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import pytest
import redis

from lm_service.engines.base import CaptionEngine
from lm_service.server import start_lm_server
from services.gateway.live import GatewayLimits
from services.transport import keys
from services.transport.lease import Lease
from tests.deploy.test_redis_ha import PARTS, check_nothing_lost_or_twice
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import Collected, clip, paced, requests_for

LEASE_TTL_S = 3.0  # TransportDefaults().lease_ttl_ms


@pytest.mark.slow
def test_a_stopped_lm_service_hands_its_sessions_over_at_once(
    make_stack: Callable[..., LiveStack], engine: CaptionEngine, redis_url: str
) -> None:
    stack = make_stack(lm_workers=-1)
    lms = {p: start_lm_server(engine, redis_url, workers=1, worker_prefix=p) for p in ("lmA", "lmB")}
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    lease = Lease(client)
    res = Collected()
    handover_s: float | None = None
    try:
        for resp in stack.stub.StreamCaptions(paced(clip(PARTS, seed=4)), timeout=120):
            res.responses.append(resp)
            if handover_s is None and len(res.captions) >= 3:
                key = keys.session_lease(res.started.session_id)
                owner = lease.owner(key)
                assert owner is not None
                holder = owner.split("-")[0]
                t0 = time.monotonic()
                lms[holder].stop(grace=1.0)  # what SIGTERM does
                while (new := lease.owner(key)) is None or new.startswith(holder):
                    assert time.monotonic() - t0 < LEASE_TTL_S, "the lease was not released"
                    time.sleep(0.02)
                handover_s = time.monotonic() - t0
    finally:
        for lm in lms.values():
            lm.stop(grace=1.0)
        client.close()
    assert handover_s is not None and handover_s < LEASE_TTL_S * 0.6, handover_s
    check_nothing_lost_or_twice(res)


def test_a_stopping_gateway_refuses_new_streams_and_lets_open_ones_finish(
    make_stack: Callable[..., LiveStack],
) -> None:
    stack = make_stack(limits=GatewayLimits(drain_seconds=20.0))
    audio = clip([("high_tone", 12.0)], seed=2)  # 4 s at 3x: longer than the old 2 s stop grace
    res = Collected()
    first = threading.Event()

    def feed():  # a client still sending while the gateway starts draining
        yield from paced(audio)

    def run() -> None:
        try:
            for resp in stack.stub.StreamCaptions(feed(), timeout=60):
                res.responses.append(resp)
                first.set()
        except grpc.RpcError as e:
            res.error = e
        finally:
            first.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert first.wait(30), "the stream did not start"
    stopper = threading.Thread(target=stack.gateway.stop, daemon=True)  # default grace: drain_seconds
    stopper.start()
    time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as refused:
        list(stack.stub.StreamCaptions(requests_for(audio[:16000]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    t.join(timeout=60)
    stopper.join(timeout=30)
    assert res.error is None, f"{res.error}\n{res.table()}"
    assert res.kinds()[-1] == "ended" and res.finals, res.table()
