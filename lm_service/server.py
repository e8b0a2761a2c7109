"""gRPC LMService (offline Caption/BatchCaption, stats) + the live LM worker loop(s)."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import redis

from lm_service.engine import SimpleEngine, adapter_loader_from_dir
from lm_service.worker import LMWorker
from services import rpc
from services.audio.io import decode_audio
from services.audio.pcm import pcm_to_mono16k
from services.captioner import pick_device
from services.errors import InvalidArgument
from services.metrics import serve_metrics
from services.model.checkpoint import load_model, load_tokenizer, resolve_model_dir
from services.model.generation import GenerationOptions
from services.model.processor import DEFAULT_PROMPT, MiDashengProcessor, prepare_audio
from services.pb.midasheng.v1 import captions_pb2, lm_pb2, lm_pb2_grpc
from services.runtime import redis_url_from, wait_for_shutdown
from services.transport.keys import TransportDefaults

log = logging.getLogger(__name__)
SERVICE = "midasheng.v1.LMService"
MAX_BATCH_ITEMS = 64
MAX_CLIP_SECONDS = 300.0
ENCODING_NAMES = {
    captions_pb2.LINEAR16: "LINEAR16",
    captions_pb2.FLOAT32: "FLOAT32",
    captions_pb2.AUDIO_ENCODING_UNSPECIFIED: "LINEAR16",
}


def request_audio(req: captions_pb2.CaptionRequest) -> np.ndarray:
    """An offline request's audio as 16 kHz mono float32 (encoded file bytes or raw PCM)."""
    which = req.WhichOneof("audio")
    if which == "encoded_audio":
        audio = decode_audio(req.encoded_audio)
    elif which == "raw_audio":
        raw = req.raw_audio
        audio = pcm_to_mono16k(
            raw.data, raw.sample_rate_hz or 16000, ENCODING_NAMES.get(raw.encoding, "?"), raw.channels or 1
        )
        if audio.size == 0:
            raise InvalidArgument("raw_audio is empty")
    else:
        raise InvalidArgument("CaptionRequest needs encoded_audio or raw_audio")
    if audio.size > MAX_CLIP_SECONDS * 16000:
        raise InvalidArgument(
            f"clips longer than {MAX_CLIP_SECONDS:.0f} s are not captioned whole; "
            "stream them or caption segments"
        )
    return audio


def options_from(pb: captions_pb2.GenerationOptions, default_max: int = 64) -> GenerationOptions:
    opts = GenerationOptions(
        max_new_tokens=pb.max_new_tokens or default_max,
        temperature=pb.temperature,
        top_p=pb.top_p or 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
    )
    opts.validate()
    return opts


@dataclass
class LMServicer(lm_pb2_grpc.LMServiceServicer):
    engine: SimpleEngine
    workers: list[LMWorker] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def _caption(self, req: captions_pb2.CaptionRequest) -> captions_pb2.CaptionResponse:
        t0 = time.perf_counter()
        audio = request_audio(req)
        t1 = time.perf_counter()
        opts = options_from(req.options)
        ((text, n),) = self.engine.caption_audio(
            [prepare_audio(audio)], req.prompt or DEFAULT_PROMPT, opts, req.adapter
        )
        t2 = time.perf_counter()
        return captions_pb2.CaptionResponse(
            text=text,
            audio_seconds=audio.size / 16000,
            request_id=req.request_id,
            adapter=req.adapter,
            timings=captions_pb2.Timings(
                decode_ms=(t1 - t0) * 1e3, generate_ms=(t2 - t1) * 1e3, total_ms=(t2 - t0) * 1e3
            ),
            finish_reason=captions_pb2.CaptionResponse.LENGTH
            if n >= opts.max_new_tokens
            else captions_pb2.CaptionResponse.STOP,
            generated_tokens=n,
        )

    @rpc.unary
    def Caption(self, request, context):  # type: ignore[no-untyped-def]
        return self._caption(request)

    @rpc.unary
    def BatchCaption(self, request, context):  # type: ignore[no-untyped-def]
        if len(request.items) > MAX_BATCH_ITEMS:
            raise InvalidArgument(f"a batch holds at most {MAX_BATCH_ITEMS} items, got {len(request.items)}")
        t0 = time.perf_counter()
        results = []
        for i, item in enumerate(request.items):
            try:
                results.append(
                    captions_pb2.BatchCaptionResult(
                        index=i, request_id=item.request_id, caption=self._caption(item)
                    )
                )
            except Exception as e:  # one bad clip does not fail the batch
                code = rpc.status_for(e)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("batch item %d failed", i)
                results.append(
                    captions_pb2.BatchCaptionResult(
                        index=i,
                        request_id=item.request_id,
                        error=captions_pb2.ItemError(code=code.value[0], message=str(e)),
                    )
                )
        return captions_pb2.BatchCaptionResponse(results=results, total_ms=(time.perf_counter() - t0) * 1e3)

    @rpc.unary
    def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        elapsed = max(1e-6, time.monotonic() - self.started)
        return lm_pb2.LMStats(
            worker_id=",".join(w.worker_id for w in self.workers),
            sessions_leased=sum(len(w.sessions) for w in self.workers),
            sessions_capacity=sum(w.max_sessions for w in self.workers),
            tokens_per_second=self.engine.tokens_generated / elapsed,
            adapters_loaded=list(self.engine._adapters),
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


def build_engine(
    model_dir: str | None,
    device: str = "auto",
    dtype: str | None = None,
    adapters_dir: str | Path | None = None,
    adapters_redis_url: str | None = None,
) -> SimpleEngine:
    dev = pick_device(device)
    path = resolve_model_dir(model_dir)
    model = load_model(path, dtype=dtype or ("bfloat16" if dev.type == "cuda" else "float32"), device=dev)
    processor = MiDashengProcessor(load_tokenizer(path), model.config)
    loader = adapter_loader_from_dir(path, adapters_dir) if adapters_dir else None
    if adapters_redis_url:  # the jobs service's registry: adapters load on first use (bounded cache)
        from services.jobs.store import adapter_loader_from_registry

        loader = adapter_loader_from_registry(adapters_redis_url, path)
    return SimpleEngine(model, processor, adapter_loader=loader)


def start_lm_server(
    engine: SimpleEngine,
    redis_url: str | None,
    address: str = "127.0.0.1:0",
    workers: int = 1,
    defaults: TransportDefaults | None = None,
    worker_prefix: str | None = None,
) -> LMServer:
    stop = threading.Event()
    lm_workers: list[LMWorker] = []
    threads: list[threading.Thread] = []
    if redis_url:
        for i in range(workers):
            client = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
            wid = f"{worker_prefix}-{i}" if worker_prefix else None
            w = LMWorker(client, engine, worker_id=wid, defaults=defaults)
            lm_workers.append(w)
            t = threading.Thread(target=w.run, args=(stop,), name=f"lm-worker-{i}", daemon=True)
            t.start()
            threads.append(t)
    servicer = LMServicer(engine, lm_workers)
    server = rpc.make_server()
    lm_pb2_grpc.add_LMServiceServicer_to_server(servicer, server)
    rpc.add_health_and_reflection(server, [SERVICE])
    port = rpc.bind(server, address)
    server.start()
    log.info("LM service listening on port %d with %d live worker(s)", port, len(lm_workers))
    return LMServer(server, port, servicer, stop, threads)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm",
        help="run the LM caption service and live worker(s)",
        description="Caption engine: leases live sessions from Redis and writes caption events; "
        "serves offline Caption/BatchCaption over gRPC.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--listen", default="127.0.0.1:50062", help="gRPC address (default: 127.0.0.1:50062)")
    p.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--workers", type=int, default=1, help="live worker loops in this process")
    p.add_argument("--worker-id", default=None, help="worker id prefix (default: random)")
    p.add_argument(
        "--adapters-dir", default=None, help="directory of LoRA adapters (NAME/adapter_config.json)"
    )
    p.add_argument(
        "--adapters-from-redis",
        action="store_true",
        help="load adapters by name from the jobs registry in Redis (instead of --adapters-dir)",
    )
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    registry = redis_url_from(args.redis_url) if args.adapters_from_redis else None
    engine = build_engine(args.model, args.device, args.dtype, args.adapters_dir, registry)
    srv = start_lm_server(
        engine, redis_url_from(args.redis_url), args.listen, args.workers, worker_prefix=args.worker_id
    )
    serve_metrics(args.metrics_port)
    print(f"lm ready on port {srv.port}", flush=True)
    return wait_for_shutdown(srv.stop)
