"""In-process live stack (encoder + LM + gateway servers on a private Redis) for the live-path tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from encoder_service.server import EncoderServer, start_encoder_server
from lm_service.engines.base import CaptionEngine
from lm_service.server import LMServer, start_lm_server
from lm_service.worker import WorkerLimits
from services.gateway.live import GatewayLimits
from services.gateway.server import GatewayServer, start_gateway
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2_grpc
from services.transport.keys import TransportDefaults


@dataclass
class LiveStack:
    redis_url: str
    encoder: EncoderServer
    lm: LMServer | None
    gateway: GatewayServer
    channel: grpc.Channel
    stub: captions_pb2_grpc.CaptionServiceStub
    extra: list[Callable[[], None]] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def stop(self) -> None:
        self.channel.close()
        self.gateway.stop(grace=1.0)
        if self.lm is not None:
            self.lm.stop(grace=1.0)
        self.encoder.stop(grace=1.0)
        for fn in self.extra:
            fn()


@pytest.fixture
def make_stack(
    redis_url: str, engine: CaptionEngine, encoder_model: MiDashengLM
) -> Iterator[Callable[..., LiveStack]]:
    """Factory: ``make_stack(limits=..., token=..., defaults=..., lm_workers=1, **start_gateway
    keywords)``; all stopped at teardown."""
    stacks: list[LiveStack] = []

    def make(
        limits: GatewayLimits | None = None,
        token: str | None = None,
        defaults: TransportDefaults | None = None,
        lm_workers: int = 1,
        lm_target: str | None = None,
        lm_limits: WorkerLimits | None = None,
        **gateway_kw: Any,
    ) -> LiveStack:
        enc = start_encoder_server(encoder_model, redis_url, defaults=defaults)
        lm = None
        if lm_workers >= 0 and lm_target is None:
            lm = start_lm_server(
                engine, redis_url, workers=lm_workers, defaults=defaults, worker_prefix="lm", limits=lm_limits
            )
            lm_target = f"127.0.0.1:{lm.port}"
        gw = start_gateway(
            redis_url, f"127.0.0.1:{enc.port}", lm_target, limits=limits, token=token, **gateway_kw
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
        stack = LiveStack(redis_url, enc, lm, gw, channel, captions_pb2_grpc.CaptionServiceStub(channel))
        stacks.append(stack)
        return stack

    yield make
    for s in reversed(stacks):
        s.stop()


@pytest.fixture
def stack(make_stack: Callable[..., LiveStack]) -> LiveStack:
    return make_stack()
