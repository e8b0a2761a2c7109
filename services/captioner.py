"""Offline captioning: a loaded model + processor that captions clips in length-sorted batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.audio.subtitles import TimedCaption, plan_segments
from services.model.checkpoint import load_model, load_tokenizer, resolve_model_dir
from services.model.generation import GenerationOptions, generate
from services.model.modeling import MiDashengLM
from services.model.processor import DEFAULT_PROMPT, MiDashengProcessor, build_prompt

SAMPLE_RATE = 16000  # Hz
LONG_AUDIO_SECONDS = 30.0  # beyond this, captioning is segmented by default (the model loops on minutes)
DEFAULT_SEGMENT_SECONDS = 10.0  # the length of the clips the model was trained on


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Captioner:
    model: MiDashengLM
    processor: MiDashengProcessor

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str] | None = None,
        device: str | None = "auto",
        dtype: str | None = None,
    ) -> Captioner:
        """Load a checkpoint directory (``None`` = the bundled demo model). bf16 on GPU by default."""
        dev = pick_device(device)
        path = resolve_model_dir(model_dir)
        dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        model = load_model(path, dtype=dtype, device=dev)
        processor = MiDashengProcessor(load_tokenizer(path), model.config)
        return cls(model, processor)

    def caption(
        self,
        audios: Sequence[np.ndarray],
        prompt: str = DEFAULT_PROMPT,
        system_prompt: str | None = None,
        options: GenerationOptions = GenerationOptions(),
        batch_size: int = 8,
    ) -> list[str]:
        """One caption per clip (16 kHz mono float32). Clips are batched by similar length."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1.")
        order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
        text = build_prompt(prompt, system_prompt)
        out: list[str] = [""] * len(audios)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = self.processor([text] * len(idx), [audios[i] for i in idx])
            ids = generate(
                self.model, inputs, self.processor.stop_ids(), options, pad_id=self.processor.pad_id
            )
            for i, row in zip(idx, ids, strict=True):
                out[i] = self.processor.decode(row)
        return out

    def caption_segments(
        self,
        audio: np.ndarray,
        segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
        prompt: str = DEFAULT_PROMPT,
        system_prompt: str | None = None,
        options: GenerationOptions = GenerationOptions(),
        batch_size: int = 8,
    ) -> list[TimedCaption]:
        """Caption consecutive segments of a long clip; timestamps in seconds of the clip."""
        total = len(audio) / SAMPLE_RATE
        spans = plan_segments(total, segment_seconds)
        pieces = [audio[int(round(a * SAMPLE_RATE)) : int(round(b * SAMPLE_RATE))] for a, b in spans]
        texts = self.caption(pieces, prompt, system_prompt, options, batch_size)
        return [TimedCaption(a, b, t) for (a, b), t in zip(spans, texts, strict=True)]
