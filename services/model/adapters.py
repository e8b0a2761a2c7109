"""LoRA adapters for serving and export: finding them by name, merging them.

An adapter is a peft directory (``adapter_config.json`` + weights). Serving looks adapters up
by name through an :data:`AdapterResolver` (a directory of adapters, or the jobs registry in
Redis) and applies them on the engine's device and dtype.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from services.errors import InvalidArgument, NotFound
from services.model.checkpoint import load_model, load_tokenizer, resolve_model_dir, save_model
from services.model.modeling import MiDashengLM

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# Decoder-only targets: what a live adapter needs, since the shared encoder service runs the base
# encoder and projector for every stream (one encoder batch serves all sessions, whatever adapter).
DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER_SIDE_TARGETS = ("attn.qkv", "attn.proj", "audio_projector.net.0", "audio_projector.net.2")

AdapterResolver = Callable[[str], Path]
"""Adapter name -> its directory; raises NotFound (unknown name) or InvalidArgument (unusable)."""


def check_adapter_dir(name: str, path: Path) -> Path:
    if not (path / ADAPTER_CONFIG).is_file():
        raise NotFound(f"Adapter {name!r} has no {ADAPTER_CONFIG} in {path}.")
    return path


def adapters_in_dir(adapters_dir: str | Path) -> AdapterResolver:
    """Adapters stored as ``adapters_dir/NAME/`` (peft format)."""
    root = Path(adapters_dir)

    def resolve(name: str) -> Path:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise InvalidArgument(f"Adapter name {name!r} is not a plain name.")
        path = root / name
        if not path.is_dir():
            raise NotFound(f"Adapter {name!r} does not exist in {root}.")
        return check_adapter_dir(name, path)

    return resolve


def adapter_targets(adapter_dir: str | Path) -> list[str]:
    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    targets = cfg.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def warn_encoder_side(adapter_dir: str | Path) -> None:
    encoder_side = sorted(set(adapter_targets(adapter_dir)) & set(ENCODER_SIDE_TARGETS))
    if encoder_side:
        log.warning(
            "adapter %s also adapts %s: live streams apply only its decoder part (the encoder service "
            "runs the base encoder); offline captioning and merged checkpoints use all of it",
            adapter_dir,
            encoder_side,
        )


def merge_into(model: MiDashengLM, adapter_dir: str | Path) -> MiDashengLM:
    """``model`` with the adapter's LoRA weights merged in (modifies and returns the model)."""
    from peft import PeftModel

    warn_encoder_side(adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()


def load_with_adapter(
    base: str | Path | None,
    adapter_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> MiDashengLM:
    """A fresh base model on ``device``/``dtype`` with a LoRA adapter merged in memory."""
    model = load_model(resolve_model_dir(str(base) if base is not None else None), dtype=dtype, device=device)
    return merge_into(model, adapter_dir)


def merge_adapter(base: str | Path | None, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Load ``base``, merge a LoRA adapter and save the result in the published layout."""
    base_dir = resolve_model_dir(str(base) if base is not None else None)
    merged = merge_into(load_model(base_dir, dtype="float32"), adapter_dir)
    return save_model(merged, out_dir, load_tokenizer(base_dir))
