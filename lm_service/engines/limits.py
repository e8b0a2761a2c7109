"""Settings of the batched caption engine (flags of ``midasheng lm`` and ``midasheng caption``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from services.errors import ConfigError

CPU_KV_DEFAULT_MB = 256  # the KV pool on a CPU when no size is given (200k tokens of the demo model)


@dataclass(frozen=True)
class EngineLimits:
    """The batched engine's memory and batching."""

    ENV_GROUP: ClassVar[str] = "ENGINE"

    kv_memory_fraction: Annotated[float, "fraction of free device memory for the KV pool (CUDA)"] = 0.5
    kv_cache_mb: Annotated[int, "KV pool size in MiB (0 = the fraction on CUDA, 256 on a CPU)"] = 0
    block_size: Annotated[int, "tokens per KV block"] = 16
    max_batch_tokens: Annotated[int, "new tokens per step (prefill chunks, decode tokens, drafts)"] = 2048
    max_running: Annotated[int, "sequences decoding at once"] = 256
    max_waiting: Annotated[int, "requests waiting for KV memory before new ones are refused"] = 4096
    max_wait_seconds: Annotated[float, "s a request may wait for KV memory before it is refused"] = 30.0
    adapter_cache_mb: Annotated[int, "MiB of LoRA adapters kept loaded"] = 1024
    drafts: Annotated[bool, "verify a stream's previous caption as a draft"] = True
    prefix_cache: Annotated[bool, "keep prompt prefixes and streams' audio KV between requests"] = True
    max_stream_states: Annotated[int, "streams whose KV and draft are kept"] = 4096

    def __post_init__(self) -> None:
        if not 0 < self.kv_memory_fraction <= 0.95:
            raise ConfigError("EngineLimits.kv_memory_fraction must be within (0, 0.95].")
        if min(self.block_size, self.max_batch_tokens, self.max_running, self.max_waiting) < 1:
            raise ConfigError(
                "EngineLimits: block_size, max_batch_tokens, max_running, max_waiting must be >= 1."
            )
        if self.kv_cache_mb < 0 or self.adapter_cache_mb < 0 or self.max_wait_seconds <= 0:
            raise ConfigError("EngineLimits: sizes must be >= 0 and max_wait_seconds > 0.")
