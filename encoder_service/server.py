"""gRPC EncoderService: thin translation between protobuf and :mod:`encoder_service.sessions`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
import redis

from encoder_service.backends import EncoderBackend, TorchBackend
from encoder_service.batcher import EncoderBatcher
from encoder_service.clips import encode_clip
from encoder_service.sessions import EncoderLimits, EncoderSessions
from services import rpc
from services.audio.io import pcm16_bytes_to_float
from services.constants import SAMPLE_RATE
from services.errors import InvalidArgument
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import encoder_pb2, encoder_pb2_grpc
from services.runtime import Periodic
from services.security import ServerSecurity
from services.transport import keys
from services.transport.connect import connect
from services.transport.keys import TransportDefaults
from services.transport.streams import StreamClient
from services.wire.tokens import PAYLOAD_FIELD, tokens_to_bytes

log = logging.getLogger(__name__)
SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


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

    @rpc.unary
    def OpenSession(
        self, request: encoder_pb2.OpenSessionRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.OpenSessionResponse:
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
            / cfg.audio_encoder_config.sample_rate,
            last_seq=last_seq,
            reattached=reattached,
        )

    @rpc.unary
    def PushAudio(
        self, request: encoder_pb2.PushAudioRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.PushAudioResponse:
        samples = samples_from(request.format, request.data)
        res = self.sessions.push(
            request.session_id, request.seq, samples, request.end_of_stream, first_seq=request.first_seq
        )
        return encoder_pb2.PushAudioResponse(
            seq=request.seq,
            duplicate=res.duplicate,
            final_tokens=res.final_tokens,
            tentative_tokens=res.tentative_tokens,
            stream_time_seconds=res.stream_seconds,
        )

    @rpc.unary
    def CloseSession(
        self, request: encoder_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.CloseSessionResponse:
        final, seconds = self.sessions.close(request.session_id, request.flush)
        return encoder_pb2.CloseSessionResponse(final_tokens=final, audio_seconds=seconds)

    @rpc.unary
    def EncodeClip(
        self, request: encoder_pb2.EncodeClipRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.EncodeClipResponse:
        samples = samples_from(request.format, request.data)
        if samples.size == 0:
            raise InvalidArgument("the clip is empty")
        t0 = time.perf_counter()
        out = encode_clip(self.model, self.sessions.batcher, samples, request.encoder_only)
        data, dtype = tokens_to_bytes(out)
        return encoder_pb2.EncodeClipResponse(
            embeddings=encoder_pb2.Tensor(shape=list(out.shape), dtype=dtype, data=data),  # type: ignore[arg-type]
            audio_seconds=samples.size / SAMPLE_RATE,
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

    @property
    def backend(self) -> EncoderBackend:
        return self.batcher.backend

    def stop(self, grace: float = 2.0) -> None:
        self._reaper.stop()
        self.server.stop(grace).wait(grace + 1)
        self.batcher.stop()
        self.batcher.backend.close()
        if self.redis is not None:
            self.redis.close()


def start_encoder_server(
    model: MiDashengLM,
    redis_url: str,
    address: str = "127.0.0.1:0",
    limits: EncoderLimits | None = None,
    defaults: TransportDefaults | None = None,
    backend: EncoderBackend | None = None,
    security: ServerSecurity | None = None,
) -> EncoderServer:
    """Serve ``model``'s streaming sessions and clips; the encoder itself runs on ``backend``
    (default: :class:`TorchBackend` on ``model.audio_encoder``), which the server closes on stop.
    ``model`` provides the config, the log-mel frontend and the projector. ``security``: TLS and
    who may call (default: plaintext, open; for loopback only)."""
    limits = limits or EncoderLimits()
    defaults = defaults or TransportDefaults()
    client = connect(redis_url, socket_timeout=5.0)
    streams = StreamClient(client)

    def publish(sid: str, payload: bytes) -> None:
        streams.add(
            keys.session_tokens(sid), {PAYLOAD_FIELD: payload}, defaults.tokens_maxlen, counter="tokens"
        )

    batcher = EncoderBatcher(
        backend or TorchBackend(model.audio_encoder),
        max_batch=limits.max_batch,
        max_wait_ms=limits.max_wait_ms,
        max_queue=limits.max_queue,
    )
    batcher.start()
    sessions = EncoderSessions(
        model,
        batcher,
        publish,
        max_sessions=limits.max_sessions,
        tolerance=limits.tentative_tolerance,
        payload_dtype=limits.payload_dtype,
        max_lag_s=limits.max_lag_seconds,
    )
    security = security or ServerSecurity()
    server = rpc.make_server(interceptors=security.interceptors())
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(model, sessions), server)
    rpc.add_health_and_reflection(server, [SERVICE])
    port = rpc.bind(server, address, security.credentials)
    server.start()
    reaper = Periodic("encoder-reaper", 5.0, lambda: sessions.expire_idle(limits.idle_seconds)).start()
    log.info("encoder service listening on port %d (%s backend)", port, batcher.backend.name)
    return EncoderServer(server, port, batcher, sessions, reaper, client)
