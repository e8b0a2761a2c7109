"""The one way to load a model for serving, evaluation and benchmarks: device, dtype, weights,
processor.

``load_pretrained(None)`` loads the bundled demo model; a directory in the published layout
loads the real one. bf16 on CUDA unless told otherwise; the frontend and ``init_bn`` always stay
fp32 (:func:`services.model.checkpoint.load_model`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from services.model.checkpoint import load_model, load_tokenizer, resolve_model_dir
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor

DTYPES = ("float32", "bfloat16")


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto``/None = the first CUDA device when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: torch.device) -> str:
    return "bfloat16" if device.type == "cuda" else "float32"


@dataclass
class LoadedModel:
    """A model on its device with its processor (None when loaded audio-only) and where it came from."""

    model: MiDashengLM
    processor: MiDashengProcessor | None
    path: Path

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def load_pretrained(
    model_dir: str | os.PathLike[str] | None = None,
    device: str | None = "auto",
    dtype: str | None = None,
    audio_only: bool = False,
) -> LoadedModel:
    """Load a checkpoint directory (None = the bundled demo model) on ``device``.

    ``audio_only`` skips the decoder and the tokenizer (the encoder service needs neither)."""
    dev = pick_device(device)
    path = resolve_model_dir(model_dir)
    model = load_model(path, dtype=dtype or default_dtype(dev), device=dev, audio_only=audio_only)
    processor = None if audio_only else MiDashengProcessor(load_tokenizer(path), model.config)
    return LoadedModel(model, processor, path)
