"""The reference engine: every caption from scratch, batched per round of submissions.

Requests queued together are grouped by (adapter, options, prompt) and decoded in batches of
``max_batch`` with :func:`services.model.generation.generate_from_audio_embeds` (prefill + a
``DynamicCache`` decode loop). Adapters are merged into their own copy of the model (a bounded
LRU) on the engine's device and dtype. Correct by construction: every live caption equals the
offline caption of the same tokens. The batched engine is tested against it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from lm_service.engines.base import (
    CaptionRequest,
    CaptionResult,
    EngineStats,
    FinishReason,
    validate_request,
)
from services import metrics
from services.errors import NotFound, ResourceExhausted
from services.model.adapters import AdapterResolver, load_with_adapter
from services.model.generation import GenerationOptions, generate_with_stops
from services.model.loading import LoadedModel
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor, build_prompt

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 16
DEFAULT_ADAPTER_CACHE = 4  # merged adapter models kept in memory
MAX_QUEUED = 4096  # requests waiting for the device


@dataclass
class _Pending:
    request: CaptionRequest
    future: Future[CaptionResult]


class ReferenceEngine:
    name = "reference"

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = DEFAULT_MAX_BATCH,
        adapters: AdapterResolver | None = None,
        adapter_cache: int = DEFAULT_ADAPTER_CACHE,
    ) -> None:
        if loaded.processor is None:
            raise ValueError("the caption engine needs the decoder and tokenizer (not an audio-only load)")
        self.loaded = loaded
        self.model: MiDashengLM = loaded.model
        self.processor: MiDashengProcessor = loaded.processor
        self.max_batch = max_batch
        self.adapters = adapters
        self.adapter_cache = adapter_cache
        self._models: OrderedDict[str, MiDashengLM] = OrderedDict()
        self._device_lock = threading.Lock()  # one forward at a time on the device
        self._queue: queue.Queue[list[_Pending]] = queue.Queue()
        self._queued = 0
        self._count_lock = threading.Lock()
        self._stats = EngineStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reference-engine", daemon=True)
        self._thread.start()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    # --- interface ------------------------------------------------------------------------------

    def submit(self, requests: Sequence[CaptionRequest]) -> list[Future[CaptionResult]]:
        for r in requests:
            validate_request(r, self.hidden_size)
        if self._stop.is_set():
            raise ResourceExhausted("the caption engine is shutting down")
        with self._count_lock:
            if self._queued + len(requests) > MAX_QUEUED:
                raise ResourceExhausted(
                    f"the caption engine has {self._queued} requests waiting; retry later"
                )
            self._queued += len(requests)
        items = [_Pending(r, Future()) for r in requests]
        if items:
            self._queue.put(items)
        return [p.future for p in items]

    def encode_audio(self, clips: Sequence[torch.Tensor], adapter: str = "") -> list[torch.Tensor]:
        model = self.model_for(adapter)
        order = sorted(range(len(clips)), key=lambda i: clips[i].numel())
        out: list[torch.Tensor | None] = [None] * len(clips)
        with self._device_lock, torch.inference_mode():
            for start in range(0, len(order), self.max_batch):
                part = order[start : start + self.max_batch]
                lengths = torch.tensor([clips[i].numel() for i in part])
                audio = torch.zeros(len(part), int(lengths.max()))
                for row, i in enumerate(part):
                    audio[row, : clips[i].numel()] = clips[i]
                tokens, _ = model.encode_audio(audio.to(model.device), lengths.to(model.device))
                for row, i in enumerate(part):
                    out[i] = tokens[row, : model.token_count(clips[i].numel())].clone()
        return [t for t in out if t is not None]

    def check_adapter(self, adapter: str) -> None:
        self.model_for(adapter)

    def end_stream(self, stream: str) -> None:
        pass  # nothing is kept per stream

    def stats(self) -> EngineStats:
        with self._count_lock:
            s = EngineStats(**vars(self._stats))
            s.waiting = self._queued
            s.adapters_loaded = list(self._models)
        return s

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        while True:  # fail whatever is left so no caller waits forever
            try:
                items = self._queue.get_nowait()
            except queue.Empty:
                break
            for p in items:
                if p.future.set_running_or_notify_cancel():
                    p.future.set_exception(ResourceExhausted("the caption engine shut down"))

    # --- adapters --------------------------------------------------------------------------------

    def model_for(self, adapter: str) -> MiDashengLM:
        """The base model, or a copy with the adapter merged (bounded LRU), on the engine's device."""
        if not adapter:
            return self.model
        with self._count_lock:
            if adapter in self._models:
                self._models.move_to_end(adapter)
                return self._models[adapter]
        if self.adapters is None:
            raise NotFound(f"Adapter {adapter!r} is not available: this server has no adapter registry.")
        path = self.adapters(adapter)
        model = load_with_adapter(self.loaded.path, path, device=self.model.device, dtype=self.model.dtype)
        with self._count_lock:
            self._models[adapter] = model
            while len(self._models) > self.adapter_cache:
                self._models.popitem(last=False)
        return model

    # --- the device loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                items = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            while True:  # everything queued now is one round
                try:
                    items += self._queue.get_nowait()
                except queue.Empty:
                    break
            with self._count_lock:
                self._queued -= len(items)
            live = [p for p in items if p.future.set_running_or_notify_cancel()]
            try:
                self._round(live)
            except Exception as e:  # never leave a caller waiting
                log.exception("caption round failed")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)

    def _round(self, items: list[_Pending]) -> None:
        groups: dict[tuple[str, GenerationOptions, str], list[_Pending]] = {}
        for p in items:
            r = p.request
            groups.setdefault(
                (r.adapter, r.options, build_prompt(r.prompt, r.system_prompt or None)), []
            ).append(p)
        for (adapter, options, prompt), group in groups.items():
            try:
                model = self.model_for(adapter)
            except Exception as e:  # an adapter that cannot load fails only its own requests
                for p in group:
                    p.future.set_exception(e)
                continue
            for start in range(0, len(group), self.max_batch):
                part = group[start : start + self.max_batch]
                try:
                    results = self._decode(model, [p.request for p in part], prompt, options)
                except Exception:  # find the culprit: each request on its own
                    if len(part) == 1:
                        raise
                    for p in part:
                        try:
                            p.future.set_result(self._decode(model, [p.request], prompt, options)[0])
                        except Exception as e:
                            p.future.set_exception(e)
                    continue
                for p, res in zip(part, results, strict=True):
                    p.future.set_result(res)

    def _decode(
        self, model: MiDashengLM, reqs: Sequence[CaptionRequest], prompt: str, options: GenerationOptions
    ) -> list[CaptionResult]:
        counts = [int(r.audio_tokens.shape[0]) for r in reqs]
        audio = torch.zeros(len(reqs), max(counts), self.hidden_size, dtype=model.dtype)
        for i, r in enumerate(reqs):
            audio[i, : counts[i]] = r.audio_tokens.to(model.dtype)
        ids, attention, _ = self.processor.encode_text([prompt] * len(reqs), counts)
        with self._device_lock:
            rows, stopped = generate_with_stops(
                model,
                ids,
                attention,
                audio,
                torch.tensor(counts),
                self.processor.stop_ids(),
                options,
                pad_id=self.processor.pad_id,
            )
        prompt_len = [int(a.sum()) for a in attention]
        out = []
        for row, stop, n in zip(rows, stopped, prompt_len, strict=True):
            reason = FinishReason.STOP if stop else FinishReason.LENGTH
            out.append(CaptionResult(self.processor.decode(row), tuple(row), reason, n, n))
        generated = sum(len(r) for r in rows)
        with self._count_lock:
            self._stats.requests += len(reqs)
            self._stats.generated_tokens += generated
            self._stats.prompt_tokens += sum(prompt_len)
            self._stats.computed_prompt_tokens += sum(prompt_len)
        metrics.GENERATED_TOKENS.inc(generated)
        return out
