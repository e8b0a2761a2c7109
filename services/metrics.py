"""Prometheus metrics of every service, defined once (names carry their units)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Gateway
GATEWAY_SESSIONS = Gauge("midasheng_gateway_sessions", "Live caption sessions open on this gateway")
CHUNK_SECONDS = Histogram(
    "midasheng_chunk_latency_seconds", "Time to accept one audio chunk (decode + encoder push)"
)
REJECTED_CHUNKS = Counter("midasheng_rejected_chunks_total", "Audio chunks rejected as invalid", ["reason"])
DROPPED_CHUNKS = Counter("midasheng_dropped_chunks_total", "Audio dropped by a bounded buffer", ["where"])
REJECTED_SESSIONS = Counter("midasheng_rejected_sessions_total", "New streams refused", ["reason"])

# Encoder
ENCODER_SESSIONS = Gauge("midasheng_encoder_sessions", "Streaming encoder sessions held")
ENCODER_BATCH = Histogram(
    "midasheng_encoder_batch_windows", "Windows per encoder micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64)
)
ENCODER_SECONDS = Histogram("midasheng_encoder_batch_seconds", "Encoder micro-batch compute time")
ENCODER_QUEUE = Gauge("midasheng_encoder_queue_jobs", "Encoder jobs waiting for the device")
TOKENS_PUBLISHED = Counter("midasheng_audio_tokens_published_total", "5 Hz audio tokens published", ["kind"])
TRITON_SECONDS = Histogram(
    "midasheng_triton_request_seconds",
    "Triton encoder inference time per request attempt (gRPC hop included)",
)
TRITON_ERRORS = Counter(
    "midasheng_triton_errors_total", "Failed Triton encoder calls by gRPC status", ["code"]
)
TRITON_RETRIES = Counter("midasheng_triton_retries_total", "Triton encoder calls retried after UNAVAILABLE")
TRITON_IN_FLIGHT = Gauge("midasheng_triton_in_flight_requests", "Triton encoder requests in flight")

# LM
LM_SESSIONS = Gauge("midasheng_lm_sessions", "Live sessions leased by this LM worker")
QUEUE_LAG = Histogram("midasheng_queue_lag_seconds", "Age of an audio-token publication when the LM reads it")
CAPTION_SECONDS = Histogram("midasheng_caption_batch_seconds", "Engine time per caption batch")
CAPTION_EVENTS = Counter("midasheng_caption_events_total", "Caption events written")
LM_DUPLICATES = Counter(
    "midasheng_lm_duplicates_total", "Redelivered publications skipped as already applied"
)
DEAD_LETTERS = Counter("midasheng_dead_letters_total", "Messages moved to the dead-letter stream")
GENERATED_TOKENS = Counter("midasheng_generated_tokens_total", "Caption tokens generated")
COALESCED = Counter(
    "midasheng_coalesced_publications_total",
    "Publications whose interim was skipped for a newer one (LM behind)",
)
PENDING = Gauge("midasheng_pending_entries", "Entries delivered but not yet acknowledged", ["stream"])
LEASE_TAKEOVERS = Counter(
    "midasheng_lease_takeovers_total",
    "Live sessions adopted after another worker had captioned them (crash, stall, stop, failover)",
)

# Redis (services/transport)
REDIS_UNREPLICATED = Counter(
    "midasheng_redis_unreplicated_writes_total",
    "Writes that wait_replicas replicas did not confirm in time (kept on the primary only)",
)

# Caption engine (batched)
ENGINE_RUNNING = Gauge("midasheng_engine_running", "Sequences the caption engine is decoding")
ENGINE_STEP_SECONDS = Histogram(
    "midasheng_engine_step_seconds", "Time of one engine step (schedule, forward, sample)"
)
ENGINE_WAITING = Gauge("midasheng_engine_waiting", "Requests waiting for KV memory")
ENGINE_KV_USED = Gauge(
    "midasheng_engine_kv_used_ratio", "Fraction of the KV pool in use (sequences and kept prefixes)"
)
PROMPT_TOKENS = Counter("midasheng_prompt_tokens_total", "Prompt tokens of finished captions", ["kind"])
DRAFT_TOKENS = Counter("midasheng_draft_tokens_total", "Caption-as-draft tokens verified", ["outcome"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP (port 0 = disabled)."""
    if port:
        start_http_server(port, addr=host)
