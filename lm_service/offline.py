"""Offline captioning: whole clips through a caption engine (``midasheng caption``, the
``Caption``/``BatchCaption`` RPCs, evaluation).

Clips are encoded to audio tokens by the engine's model (length-sorted batches), then captioned
as engine requests, which the engine batches like any others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lm_service.engines import DEFAULT_ENGINE, make_engine
from lm_service.engines.base import CaptionEngine, CaptionRequest, CaptionResult
from lm_service.engines.limits import EngineLimits
from services.audio.subtitles import TimedCaption, plan_segments
from services.constants import DEFAULT_OFFLINE_MAX_NEW_TOKENS, DEFAULT_PROMPT, SAMPLE_RATE
from services.model.adapters import AdapterResolver
from services.model.generation import GenerationOptions
from services.model.loading import load_pretrained
from services.model.processor import prepare_audio

LONG_AUDIO_SECONDS = 30.0  # beyond this, captioning is segmented by default (the model loops on minutes)
DEFAULT_SEGMENT_SECONDS = 10.0  # the length of the clips the model was trained on
OFFLINE_OPTIONS = GenerationOptions(max_new_tokens=DEFAULT_OFFLINE_MAX_NEW_TOKENS)
RESULT_TIMEOUT_S = 600.0


@dataclass
class Captioner:
    engine: CaptionEngine

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str] | None = None,
        device: str | None = "auto",
        dtype: str | None = None,
        engine: str = DEFAULT_ENGINE,
        adapters: AdapterResolver | None = None,
        max_batch: int | None = None,
        limits: EngineLimits | None = None,
    ) -> Captioner:
        """Load a checkpoint directory (None = the bundled demo model). bf16 on GPU by default;
        ``max_batch`` clips per forward pass (the engine's default when None)."""
        loaded = load_pretrained(model_dir, device, dtype)
        return cls(make_engine(engine, loaded, adapters=adapters, max_batch=max_batch, limits=limits))

    def close(self) -> None:
        self.engine.close()

    def caption_clips(
        self,
        audios: Sequence[np.ndarray | torch.Tensor],
        prompt: str = DEFAULT_PROMPT,
        options: GenerationOptions = OFFLINE_OPTIONS,
        adapter: str = "",
        system_prompt: str | None = None,
    ) -> list[CaptionResult]:
        """One result per clip (16 kHz mono float32)."""
        if not audios:
            return []
        clips = [prepare_audio(a) for a in audios]
        tokens = self.engine.encode_audio(clips, adapter)
        requests = [CaptionRequest(t, prompt, options, adapter, system_prompt or "") for t in tokens]
        return [f.result(RESULT_TIMEOUT_S) for f in self.engine.submit(requests)]

    def caption(
        self,
        audios: Sequence[np.ndarray],
        prompt: str = DEFAULT_PROMPT,
        system_prompt: str | None = None,
        options: GenerationOptions = OFFLINE_OPTIONS,
    ) -> list[str]:
        """One caption per clip (16 kHz mono float32)."""
        return [r.text for r in self.caption_clips(audios, prompt, options, system_prompt=system_prompt)]

    def caption_segments(
        self,
        audio: np.ndarray,
        segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
        prompt: str = DEFAULT_PROMPT,
        system_prompt: str | None = None,
        options: GenerationOptions = OFFLINE_OPTIONS,
    ) -> list[TimedCaption]:
        """Caption consecutive segments of a long clip; timestamps in seconds of the clip."""
        total = len(audio) / SAMPLE_RATE
        spans = plan_segments(total, segment_seconds)
        pieces = [audio[int(round(a * SAMPLE_RATE)) : int(round(b * SAMPLE_RATE))] for a, b in spans]
        texts = self.caption(pieces, prompt, system_prompt, options)
        return [TimedCaption(a, b, t) for (a, b), t in zip(spans, texts, strict=True)]
