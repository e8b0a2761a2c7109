"""gRPC EncoderService: thin translation between protobuf and :mod:`encoder_service.sessions`."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import redis
import torch

from encoder_service.batcher import EncoderBatcher
from encoder_service.sessions import EncoderSessions
from services import rpc
from services.audio.io import pcm16_bytes_to_float
from services.captioner import pick_device
from services.errors import InvalidArgument
from services.metrics import serve_metrics
from services.model.checkpoint import load_model
from services.model.modeling import MiDashengLM
from services.model.processor import prepare_audio
from services.pb.midasheng.v1 import encoder_pb2, encoder_pb2_grpc
from services.runtime import Periodic, redis_url_from, wait_for_shutdown
from services.streaming.codec import PAYLOAD_FIELD, tokens_to_bytes
from services.transport import keys
from services.transport.keys import TransportDefaults
from services.transport.streams import StreamClient

log = logging.getLogger(__name__)
SERVICE = "midasheng.v1.EncoderService"
IDLE_SECONDS = 300.0  # encoder sessions without audio for this long are flushed and closed


def samples_from(fmt: int, data: bytes) -> np.ndarray:
    if fmt in (encoder_pb2.SAMPLE_FORMAT_UNSPECIFIED, encoder_pb2.SAMPLE_FORMAT_FLOAT32):
        if len(data) % 4:
            raise InvalidArgument(f"float32 audio must be a multiple of 4 bytes, got {len(data)}")
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif fmt == encoder_pb2.SAMPLE_FORMAT_INT16:
        x = pcm16_bytes_to_float(data)
    else:
        raise InvalidArgument(f"unknown sample format {fmt}")
    if not np.isfinite(x).all():
        raise InvalidArgument("audio holds NaN or infinite samples")
    return x


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, model: MiDashengLM, sessions: EncoderSessions) -> None:
        self.model = model
        self.sessions = sessions
        self._lock = threading.Lock()

    @rpc.unary
    def OpenSession(self, request, context):  # type: ignore[no-untyped-def]
        last_seq, reattached = self.sessions.open(
            request.session_id, request.emit_interval_seconds, reattach_only=request.reattach_only
        )
        cfg = self.model.config
        return encoder_pb2.OpenSessionResponse(
            session_id=request.session_id,
            sample_rate_hz=cfg.audio_encoder_config.sample_rate,
            token_rate_hz=cfg.audio_encoder_config.sample_rate / cfg.samples_per_token,
            hidden_size=cfg.hidden_size,
            window_seconds=cfg.audio_encoder_config.target_length
            * cfg.audio_encoder_config.hop_length
            / 16000,
            last_seq=last_seq,
            reattached=reattached,
        )

    @rpc.unary
    def PushAudio(self, request, context):  # type: ignore[no-untyped-def]
        samples = samples_from(request.format, request.data)
        res = self.sessions.push(request.session_id, request.seq, samples, request.end_of_stream)
        return encoder_pb2.PushAudioResponse(
            seq=request.seq,
            duplicate=res.duplicate,
            final_tokens=res.final_tokens,
            tentative_tokens=res.tentative_tokens,
            stream_time_seconds=res.stream_seconds,
        )

    @rpc.unary
    def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        final, seconds = self.sessions.close(request.session_id, request.flush)
        return encoder_pb2.CloseSessionResponse(final_tokens=final, audio_seconds=seconds)

    @rpc.unary
    def EncodeClip(self, request, context):  # type: ignore[no-untyped-def]
        samples = samples_from(request.format, request.data)
        if samples.size == 0:
            raise InvalidArgument("the clip is empty")
        t0 = time.perf_counter()
        wav = prepare_audio(samples)
        with torch.inference_mode(), self._lock:
            lengths = torch.tensor([wav.numel()], device=self.model.device)
            audio = wav[None].to(self.model.device)
            if request.encoder_only:
                feats, _ = self.model.audio_encoder.forward_audio(audio, lengths)
                out = feats[0]
            else:
                tokens, _ = self.model.encode_audio(audio, lengths)
                out = tokens[0, : self.model.token_count(wav.numel())]
        data, dtype = tokens_to_bytes(out)
        return encoder_pb2.EncodeClipResponse(
            embeddings=encoder_pb2.Tensor(shape=list(out.shape), dtype=dtype, data=data),  # type: ignore[arg-type]
            audio_seconds=samples.size / 16000,
            encode_ms=(time.perf_counter() - t0) * 1000,
        )


@dataclass
class EncoderServer:
    server: grpc.Server
    port: int
    batcher: EncoderBatcher
    sessions: EncoderSessions
    _reaper: Periodic
    redis: redis.Redis | None = None

    def stop(self, grace: float = 2.0) -> None:
        self._reaper.stop()
        self.server.stop(grace).wait(grace + 1)
        self.batcher.stop()
        if self.redis is not None:
            self.redis.close()


def start_encoder_server(
    model: MiDashengLM,
    redis_url: str,
    address: str = "127.0.0.1:0",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    defaults: TransportDefaults | None = None,
    idle_seconds: float = IDLE_SECONDS,
) -> EncoderServer:
    defaults = defaults or TransportDefaults()
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    streams = StreamClient(client)

    def publish(sid: str, payload: bytes) -> None:
        streams.add(
            keys.session_tokens(sid), {PAYLOAD_FIELD: payload}, defaults.tokens_maxlen, counter="tokens"
        )

    batcher = EncoderBatcher(model.audio_encoder, max_batch=max_batch, max_wait_ms=max_wait_ms)
    batcher.start()
    sessions = EncoderSessions(model, batcher, publish)
    server = rpc.make_server()
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(model, sessions), server)
    rpc.add_health_and_reflection(server, [SERVICE])
    port = rpc.bind(server, address)
    server.start()
    reaper = Periodic("encoder-reaper", 5.0, lambda: sessions.expire_idle(idle_seconds)).start()
    log.info("encoder service listening on port %d", port)
    return EncoderServer(server, port, batcher, sessions, reaper, client)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encoder",
        help="run the streaming encoder gRPC service",
        description="Streaming Dasheng encoder: per-session log-mel + encoder + projector, "
        "micro-batched across sessions; publishes audio tokens to Redis.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--listen", default="127.0.0.1:50061", help="gRPC address (default: 127.0.0.1:50061)")
    p.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--max-batch", type=int, default=32, help="windows per device batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dev = pick_device(args.device)
    model = load_model(
        args.model,
        dtype=args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"),
        device=dev,
        audio_only=True,
    )
    srv = start_encoder_server(
        model, redis_url_from(args.redis_url), args.listen, args.max_batch, args.max_wait_ms
    )
    serve_metrics(args.metrics_port)
    print(f"encoder ready on port {srv.port}", flush=True)
    return wait_for_shutdown(srv.stop)
