"""Caption engine: turns windows of audio tokens into caption text, batched on the device.

The engine is behind a small interface (:class:`CaptionEngine`) so a faster one (reused KV
cache, continuous batching) can replace :class:`SimpleEngine` without touching the worker.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from services import metrics
from services.errors import InvalidArgument, NotFound
from services.model.generation import GenerationOptions, generate, generate_from_audio_embeds
from services.model.modeling import MiDashengLM
from services.model.processor import DEFAULT_PROMPT, MiDashengProcessor, build_prompt

DEFAULT_MAX_BATCH = 16
DEFAULT_ADAPTER_CACHE = 4  # merged adapter models kept in memory


@dataclass(frozen=True)
class CaptionRequest:
    """One window to caption: (n, H) audio tokens + prompt + decoding options."""

    audio_tokens: torch.Tensor
    prompt: str = DEFAULT_PROMPT
    options: GenerationOptions = field(default_factory=GenerationOptions)
    adapter: str = ""  # "" = the base model


class CaptionEngine(Protocol):
    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]: ...

    def check_adapter(self, adapter: str) -> None: ...


class SimpleEngine:
    """Captions each window from scratch (prefill + greedy/sampled decode), batching requests that
    share a model and decoding options. Correct by construction: every caption equals the
    offline caption of the same tokens."""

    def __init__(
        self,
        model: MiDashengLM,
        processor: MiDashengProcessor,
        max_batch: int = DEFAULT_MAX_BATCH,
        adapter_loader: Callable[[str], MiDashengLM] | None = None,
        adapter_cache: int = DEFAULT_ADAPTER_CACHE,
    ) -> None:
        self.model = model
        self.processor = processor
        self.max_batch = max_batch
        self.adapter_loader = adapter_loader
        self.adapter_cache = adapter_cache
        self._adapters: OrderedDict[str, MiDashengLM] = OrderedDict()
        self._lock = threading.Lock()  # one forward at a time on the device
        self.tokens_generated = 0

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def model_for(self, adapter: str) -> MiDashengLM:
        """The base model, or the base with a LoRA adapter merged (bounded LRU cache)."""
        if not adapter:
            return self.model
        if adapter in self._adapters:
            self._adapters.move_to_end(adapter)
            return self._adapters[adapter]
        if self.adapter_loader is None:
            raise NotFound(f"Adapter {adapter!r} is not available: this server has no adapter registry.")
        model = self.adapter_loader(adapter)
        self._adapters[adapter] = model
        while len(self._adapters) > self.adapter_cache:
            self._adapters.popitem(last=False)
        return model

    def check_adapter(self, adapter: str) -> None:
        """Load (and cache) an adapter now; raises NotFound for an unknown name."""
        with self._lock:
            self.model_for(adapter)

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups: dict[tuple[str, GenerationOptions, str], list[int]] = {}
        for i, r in enumerate(requests):
            if r.audio_tokens.dim() != 2 or r.audio_tokens.shape[1] != self.hidden_size:
                raise InvalidArgument(
                    f"audio tokens must be (n, {self.hidden_size}), got {tuple(r.audio_tokens.shape)}"
                )
            if r.audio_tokens.shape[0] == 0:
                raise InvalidArgument("a caption window holds no audio tokens")
            groups.setdefault((r.adapter, r.options, r.prompt), []).append(i)
        with self._lock:
            for (adapter, options, prompt), idx in groups.items():
                model = self.model_for(adapter)
                for start in range(0, len(idx), self.max_batch):
                    part = idx[start : start + self.max_batch]
                    texts = self._run(model, [requests[i] for i in part], prompt, options)
                    for i, t in zip(part, texts, strict=True):
                        out[i] = t
        return out

    def caption_audio(
        self, audios: Sequence[torch.Tensor], prompt: str, options: GenerationOptions, adapter: str = ""
    ) -> list[tuple[str, int]]:
        """Offline path: whole clips (16 kHz fp32, already padded to >= 0.2 s) -> (caption, tokens)."""
        with self._lock:
            model = self.model_for(adapter)
            out: list[tuple[str, int]] = []
            order = sorted(range(len(audios)), key=lambda i: audios[i].numel())
            results: dict[int, tuple[str, int]] = {}
            for start in range(0, len(order), self.max_batch):
                part = order[start : start + self.max_batch]
                inputs = self.processor([build_prompt(prompt)] * len(part), [audios[i] for i in part])
                rows = generate(
                    model, inputs, self.processor.stop_ids(), options, pad_id=self.processor.pad_id
                )
                self._count(rows)
                for i, r in zip(part, rows, strict=True):
                    results[i] = (self.processor.decode(r), len(r))
            out = [results[i] for i in range(len(audios))]
        return out

    def _run(
        self, model: MiDashengLM, reqs: Sequence[CaptionRequest], prompt: str, options: GenerationOptions
    ) -> list[str]:
        counts = [int(r.audio_tokens.shape[0]) for r in reqs]
        audio = torch.zeros(len(reqs), max(counts), self.hidden_size, dtype=model.dtype)
        for i, r in enumerate(reqs):
            audio[i, : counts[i]] = r.audio_tokens.to(model.dtype)
        ids, attention, _ = self.processor.encode_text([build_prompt(prompt)] * len(reqs), counts)
        rows = generate_from_audio_embeds(
            model,
            ids,
            attention,
            audio,
            torch.tensor(counts),
            self.processor.stop_ids(),
            options,
            pad_id=self.processor.pad_id,
        )
        self._count(rows)
        return [self.processor.decode(r) for r in rows]

    def _count(self, rows: Sequence[Sequence[int]]) -> None:
        n = sum(len(r) for r in rows)
        self.tokens_generated += n
        metrics.GENERATED_TOKENS.inc(n)


def adapter_loader_from_dir(
    base_model_dir: str | Path, adapters_dir: str | Path
) -> Callable[[str], MiDashengLM]:
    """Adapters stored as ``adapters_dir/NAME/`` (peft format), merged into a fresh base model."""

    def load(name: str) -> MiDashengLM:
        from services.training.train import load_with_adapter

        path = Path(adapters_dir) / name
        if not (path / "adapter_config.json").exists():
            raise NotFound(f"Adapter {name!r} does not exist in {adapters_dir}.")
        return load_with_adapter(base_model_dir, path)

    return load
