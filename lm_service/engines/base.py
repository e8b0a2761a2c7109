"""The caption engine interface: what ``lm_service`` needs from whatever decodes captions.

An engine turns windows of audio tokens into caption text on its device. Requests are submitted
and come back through futures, so an engine that batches continuously is not forced into the
caller's rounds; a request is cancelled with ``future.cancel()`` (honoured between engine steps).

Engines (``--engine``): ``reference`` (:mod:`lm_service.engines.reference`: every caption from
scratch, the correctness baseline) and ``batched`` (:mod:`lm_service.engines.batched`). Every
engine must pass ``tests/lm_service/test_engine_conformance.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from services.constants import DEFAULT_PROMPT
from services.model.generation import GenerationOptions


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model ended the caption
    LENGTH = "length"  # max_new_tokens reached


@dataclass(frozen=True)
class CaptionRequest:
    """One window to caption: (n, H) audio tokens, the question, decoding options, the adapter.

    ``stream`` names the live stream the window belongs to ("" = a one-off request) and
    ``audio_start`` is the stream index of ``audio_tokens[0]``; ``num_final`` leading tokens are
    final (they will be the same in the stream's next window that starts at ``audio_start``).
    Engines may keep per-stream state from them, and may verify ``draft`` (by default the stream's
    previous caption) instead of decoding token by token; the result never depends on either."""

    audio_tokens: torch.Tensor  # (n, H)
    prompt: str = DEFAULT_PROMPT
    options: GenerationOptions = field(default_factory=GenerationOptions)
    adapter: str = ""  # "" = the base model
    system_prompt: str = ""  # an optional system turn before the user's
    stream: str = ""
    audio_start: int = 0
    num_final: int = 0
    draft: tuple[int, ...] | None = (
        None  # tokens the caption probably starts with (None = the engine's guess)
    )


@dataclass(frozen=True)
class CaptionResult:
    text: str
    token_ids: tuple[int, ...]  # generated, without the stop token
    finish_reason: FinishReason
    prompt_tokens: int = 0  # tokens of the prompt, audio included
    computed_prompt_tokens: int = 0  # of those, how many this request ran through the decoder
    draft_tokens: int = 0  # tokens proposed by the draft (a stream's previous caption)
    accepted_tokens: int = 0  # of those, how many decoding agreed with


@dataclass
class EngineStats:
    """Counters since the engine started, and what it holds now."""

    requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    running: int = 0
    waiting: int = 0
    kv_used_tokens: int = 0  # KV slots in use
    kv_capacity_tokens: int = 0  # KV slots in the pool (0 = no pool)
    adapters_loaded: list[str] = field(default_factory=list)


class CaptionEngine(Protocol):
    name: str

    @property
    def hidden_size(self) -> int: ...

    def submit(self, requests: Sequence[CaptionRequest]) -> list[Future[CaptionResult]]:
        """Queue requests (validated now: bad shapes raise InvalidArgument); one future each.
        A future fails with the request's own error (NotFound adapter, ResourceExhausted, ...)."""
        ...

    def encode_audio(self, clips: Sequence[torch.Tensor], adapter: str = "") -> list[torch.Tensor]:
        """Offline clips (16 kHz fp32, see ``prepare_audio``) -> their (n_i, H) audio tokens, with
        the adapter's encoder-side weights when it has any."""
        ...

    def check_adapter(self, adapter: str) -> None:
        """Raise NotFound / InvalidArgument now for an adapter that cannot be used."""
        ...

    def end_stream(self, stream: str) -> None:
        """A live stream ended or moved to another worker: drop what the engine kept for it."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


def validate_request(r: CaptionRequest, hidden_size: int) -> None:
    from services.errors import InvalidArgument

    if r.audio_tokens.dim() != 2 or r.audio_tokens.shape[1] != hidden_size:
        raise InvalidArgument(f"audio tokens must be (n, {hidden_size}), got {tuple(r.audio_tokens.shape)}")
    if r.audio_tokens.shape[0] == 0:
        raise InvalidArgument("a caption window holds no audio tokens")
    if not 0 <= r.num_final <= r.audio_tokens.shape[0]:
        raise InvalidArgument(f"num_final {r.num_final} outside [0, {r.audio_tokens.shape[0]}]")
    r.options.validate()


def caption_all(
    engine: CaptionEngine, requests: Sequence[CaptionRequest], timeout: float | None = None
) -> list[CaptionResult]:
    """Submit and wait for every result (the first failure raises)."""
    return [f.result(timeout) for f in engine.submit(requests)]
