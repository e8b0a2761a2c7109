"""gRPC LMService (offline Caption/BatchCaption, stats) + the live LM worker loop(s)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import grpc
import numpy as np

from lm_service.engines import DEFAULT_ENGINE, make_engine
from lm_service.engines.base import CaptionEngine, CaptionResult, FinishReason
from lm_service.engines.limits import EngineLimits
from lm_service.offline import Captioner
from lm_service.worker import LMWorker, WorkerLimits
from services import rpc
from services.audio.io import decode_audio
from services.audio.pcm import pcm_to_mono16k
from services.constants import (
    DEFAULT_OFFLINE_MAX_NEW_TOKENS,
    DEFAULT_PROMPT,
    MAX_CLIP_SECONDS,
    SAMPLE_RATE,
)
from services.errors import ConfigError, InvalidArgument, ResourceExhausted
from services.model.adapters import AdapterResolver, adapters_in_dir
from services.model.generation import GenerationOptions
from services.model.loading import load_pretrained
from services.pb.midasheng.v1 import captions_pb2, lm_pb2, lm_pb2_grpc
from services.security import ServerSecurity
from services.transport.connect import connect
from services.transport.keys import TransportDefaults
from services.wire.limits import check_batch_size, check_caption_request
from services.wire.settings import encoding_from_pb

log = logging.getLogger(__name__)
SERVICE = lm_pb2.DESCRIPTOR.services_by_name["LMService"].full_name


@dataclass(frozen=True)
class OfflineLimits:
    """How much offline captioning (Caption, BatchCaption) one LM process takes on beside its live
    sessions: a few calls at a time, a bounded line of waiting ones, a few clips per engine pass."""

    ENV_GROUP: ClassVar[str] = "LM"

    offline_max_calls: Annotated[int, "offline calls decoding and captioning at once"] = 2
    offline_max_waiting: Annotated[int, "offline calls waiting for a turn; more are refused at once"] = 8
    offline_wait_seconds: Annotated[float, "s a call waits for its turn before it is refused"] = 30.0
    offline_clips_per_pass: Annotated[int, "clips of one call handed to the engine at once"] = 8
    offline_retry_after_seconds: Annotated[float, "s a refused offline client is told to wait"] = 5.0

    def __post_init__(self) -> None:
        if min(self.offline_max_calls, self.offline_clips_per_pass) < 1 or self.offline_max_waiting < 0:
            raise ConfigError(
                "offline_max_calls and offline_clips_per_pass must be >= 1, offline_max_waiting >= 0"
            )


class OfflineGate:
    """Admits offline calls: ``offline_max_calls`` run, ``offline_max_waiting`` wait (each at most
    ``offline_wait_seconds``), the rest get RESOURCE_EXHAUSTED with a retry hint at once. Live
    captioning never waits for it."""

    def __init__(self, limits: OfflineLimits) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.offline_max_calls)
        self._admitted = 0
        self._lock = threading.Lock()

    def _refuse(self, why: str) -> ResourceExhausted:
        wait = self.limits.offline_retry_after_seconds
        return ResourceExhausted(f"{why}; retry in {wait:.0f} s", retry_after=wait)

    @contextmanager
    def turn(self) -> Iterator[None]:
        lim = self.limits
        with self._lock:
            if self._admitted >= lim.offline_max_calls + lim.offline_max_waiting:
                raise self._refuse(f"this LM service is busy with {self._admitted} offline calls")
            self._admitted += 1
        try:
            if not self._slots.acquire(timeout=lim.offline_wait_seconds):
                raise self._refuse(
                    f"no offline captioning slot came free within {lim.offline_wait_seconds:.0f} s"
                )
            try:
                yield
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._admitted -= 1


def request_audio(req: captions_pb2.CaptionRequest) -> np.ndarray:
    """An offline request's audio as 16 kHz mono float32 (encoded file bytes or raw PCM); checks
    the request's documented limits first and stops decoding past MAX_CLIP_SECONDS."""
    check_caption_request(req)
    which = req.WhichOneof("audio")
    if which == "encoded_audio":
        audio = decode_audio(req.encoded_audio, max_seconds=MAX_CLIP_SECONDS)
    elif which == "raw_audio":
        raw = req.raw_audio
        audio = pcm_to_mono16k(
            raw.data, raw.sample_rate_hz or SAMPLE_RATE, encoding_from_pb(raw.encoding), raw.channels or 1
        )
        if audio.size == 0:
            raise InvalidArgument("raw_audio is empty")
    else:
        raise InvalidArgument("CaptionRequest needs encoded_audio or raw_audio")
    if audio.size > MAX_CLIP_SECONDS * SAMPLE_RATE:
        raise InvalidArgument(
            f"clips longer than {MAX_CLIP_SECONDS:.0f} s are not captioned whole; stream them or caption segments"
        )
    return audio


def options_from(pb: captions_pb2.GenerationOptions) -> GenerationOptions:
    opts = GenerationOptions(
        max_new_tokens=pb.max_new_tokens or DEFAULT_OFFLINE_MAX_NEW_TOKENS,
        temperature=pb.temperature,
        top_p=pb.top_p or 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
    )
    opts.validate()
    return opts


def response_pb(
    req: captions_pb2.CaptionRequest,
    result: CaptionResult,
    audio: np.ndarray,
    decode_ms: float,
    generate_ms: float,
) -> captions_pb2.CaptionResponse:
    stop = result.finish_reason is FinishReason.STOP
    return captions_pb2.CaptionResponse(
        text=result.text,
        audio_seconds=audio.size / SAMPLE_RATE,
        request_id=req.request_id,
        adapter=req.adapter,
        timings=captions_pb2.Timings(
            decode_ms=decode_ms, generate_ms=generate_ms, total_ms=decode_ms + generate_ms
        ),
        finish_reason=captions_pb2.CaptionResponse.STOP if stop else captions_pb2.CaptionResponse.LENGTH,
        generated_tokens=len(result.token_ids),
    )


@dataclass
class LMServicer(lm_pb2_grpc.LMServiceServicer):
    engine: CaptionEngine
    workers: list[LMWorker] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    offline: OfflineLimits = field(default_factory=OfflineLimits)

    def __post_init__(self) -> None:
        self.captioner = Captioner(self.engine)
        self.gate = OfflineGate(self.offline)

    @rpc.unary
    def Caption(
        self, request: captions_pb2.CaptionRequest, context: grpc.ServicerContext
    ) -> captions_pb2.CaptionResponse:
        check_caption_request(request)  # before waiting for a turn
        with self.gate.turn():
            return self._batch([request])[0]  # type: ignore[return-value]

    @rpc.unary
    def BatchCaption(
        self, request: captions_pb2.BatchCaptionRequest, context: grpc.ServicerContext
    ) -> captions_pb2.BatchCaptionResponse:
        check_batch_size(len(request.items))
        t0 = time.perf_counter()
        results = []
        with self.gate.turn():
            outcomes = self._batch(request.items, isolate=True)
        for i, (item, out) in enumerate(zip(request.items, outcomes, strict=True)):
            if isinstance(out, captions_pb2.CaptionResponse):
                results.append(
                    captions_pb2.BatchCaptionResult(index=i, request_id=item.request_id, caption=out)
                )
                continue
            code = rpc.status_for(out)  # one bad clip does not fail the batch
            if code is grpc.StatusCode.INTERNAL:
                log.error("batch item %d failed", i, exc_info=out)
            error = captions_pb2.ItemError(code=code.value[0], message=str(out))
            results.append(captions_pb2.BatchCaptionResult(index=i, request_id=item.request_id, error=error))
        return captions_pb2.BatchCaptionResponse(results=results, total_ms=(time.perf_counter() - t0) * 1e3)

    def _batch(
        self, items: list[captions_pb2.CaptionRequest], isolate: bool = False
    ) -> list[captions_pb2.CaptionResponse | Exception]:
        """Caption items together: decode every clip, then one pass through the engine per
        (prompt, options, adapter). With ``isolate`` an item's error is returned in its place."""
        out: list[captions_pb2.CaptionResponse | Exception] = [InvalidArgument("not captioned")] * len(items)
        ready: dict[tuple[str, GenerationOptions, str], list[tuple[int, np.ndarray, float]]] = {}
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            try:
                audio, opts = request_audio(item), options_from(item.options)
            except Exception as e:
                if not isolate:
                    raise
                out[i] = e
                continue
            key = (item.prompt or DEFAULT_PROMPT, opts, item.adapter)
            ready.setdefault(key, []).append((i, audio, (time.perf_counter() - t0) * 1e3))
        step = self.offline.offline_clips_per_pass
        for (prompt, opts, adapter), whole in ready.items():
            for k in range(0, len(whole), step):  # a few clips in the engine at a time
                group = whole[k : k + step]
                t0 = time.perf_counter()
                try:
                    results = self.captioner.caption_clips([a for _, a, _ in group], prompt, opts, adapter)
                except Exception as e:
                    if not isolate:
                        raise
                    for i, _, _ in group:
                        out[i] = e
                    continue
                per_item_ms = (time.perf_counter() - t0) * 1e3
                for (i, audio, decode_ms), result in zip(group, results, strict=True):
                    out[i] = response_pb(items[i], result, audio, decode_ms, per_item_ms)
        return out

    @rpc.unary
    def GetStats(self, request: lm_pb2.GetStatsRequest, context: grpc.ServicerContext) -> lm_pb2.LMStats:
        elapsed = max(1e-6, time.monotonic() - self.started)
        stats = self.engine.stats()
        return lm_pb2.LMStats(
            worker_id=",".join(w.worker_id for w in self.workers),
            sessions_leased=sum(len(w.sessions) for w in self.workers),
            sessions_capacity=sum(w.limits.max_sessions for w in self.workers),
            tokens_per_second=stats.generated_tokens / elapsed,
            adapters_loaded=stats.adapters_loaded,
        )


@dataclass
class LMServer:
    server: grpc.Server
    port: int
    servicer: LMServicer
    stop_event: threading.Event
    threads: list[threading.Thread]

    def stop(self, grace: float = 2.0) -> None:
        self.stop_event.set()
        self.server.stop(grace).wait(grace + 1)
        for t in self.threads:
            t.join(timeout=5)
        for w in self.servicer.workers:
            w.redis.close()


def adapter_resolver(
    model_dir: str | Path, adapters_dir: str | Path | None = None, registry_redis_url: str | None = None
) -> AdapterResolver | None:
    """Where adapters come from: the jobs registry in Redis, a directory, or nowhere."""
    if registry_redis_url:  # the jobs service's registry
        from services.jobs.store import adapters_in_registry

        return adapters_in_registry(registry_redis_url, model_dir)
    return adapters_in_dir(adapters_dir) if adapters_dir else None


def build_engine(
    model_dir: str | None,
    device: str = "auto",
    dtype: str | None = None,
    adapters_dir: str | Path | None = None,
    adapters_redis_url: str | None = None,
    engine: str = DEFAULT_ENGINE,
    max_batch: int | None = None,
    limits: EngineLimits | None = None,
) -> CaptionEngine:
    loaded = load_pretrained(model_dir, device, dtype)
    adapters = adapter_resolver(loaded.path, adapters_dir, adapters_redis_url)
    return make_engine(engine, loaded, adapters=adapters, max_batch=max_batch, limits=limits)


def start_lm_server(
    engine: CaptionEngine,
    redis_url: str | None,
    address: str = "127.0.0.1:0",
    workers: int = 1,
    defaults: TransportDefaults | None = None,
    worker_prefix: str | None = None,
    limits: WorkerLimits | None = None,
    security: ServerSecurity | None = None,
    offline: OfflineLimits | None = None,
) -> LMServer:
    stop = threading.Event()
    lm_workers: list[LMWorker] = []
    threads: list[threading.Thread] = []
    if redis_url:
        for i in range(workers):
            client = connect(redis_url, socket_timeout=5.0)
            wid = f"{worker_prefix}-{i}" if worker_prefix else None
            w = LMWorker(client, engine, worker_id=wid, defaults=defaults, limits=limits)
            lm_workers.append(w)
            t = threading.Thread(target=w.run, args=(stop,), name=f"lm-worker-{i}", daemon=True)
            t.start()
            threads.append(t)
    servicer = LMServicer(engine, lm_workers, offline=offline or OfflineLimits())
    security = security or ServerSecurity()
    server = rpc.make_server(interceptors=security.interceptors())
    lm_pb2_grpc.add_LMServiceServicer_to_server(servicer, server)
    rpc.add_health_and_reflection(server, [SERVICE])
    port = rpc.bind(server, address, security.credentials)
    server.start()
    log.info("LM service listening on port %d with %d live worker(s)", port, len(lm_workers))
    return LMServer(server, port, servicer, stop, threads)
