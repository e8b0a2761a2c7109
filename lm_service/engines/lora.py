"""LoRA adapters applied unmerged: each request's rows get their own adapter's low-rank update.

A peft adapter directory is read once into per-module (A, B, scale) on the engine's device and
dtype. In a batch that mixes adapters (and the base model), a target linear layer computes the
base output for every row, then adds ``scale * (x @ A.T) @ B.T`` to the rows of each adapter
present. Adapters are kept in an LRU bounded by bytes.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from services.errors import InvalidArgument, NotFound
from services.model.adapters import ADAPTER_CONFIG, AdapterResolver

DECODER_KEY = re.compile(
    r"^base_model\.model\.decoder\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
ENCODER_KEY = re.compile(r"^base_model\.model\.((?:audio_encoder|audio_projector)\..+)\.lora_([AB])\.weight$")
DECODER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LoraWeights = tuple[torch.Tensor, torch.Tensor, float]  # A (r, in), B (out, r), scale


@dataclass
class LoraAdapter:
    name: str
    decoder: dict[tuple[int, str], LoraWeights]  # (layer, module) -> weights
    encoder: dict[str, LoraWeights] = field(default_factory=dict)  # module path -> weights (offline only)
    nbytes: int = 0


def _scale(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    patterns: Any = cfg.get("alpha_pattern") or {}
    for pattern, value in patterns.items():
        if re.search(pattern, module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def load_lora(name: str, path: Path, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
    """Read a peft LoRA directory; unsupported variants are InvalidArgument."""
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"Adapter {name!r}: cannot read {ADAPTER_CONFIG}: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("lora_bias"):
        raise InvalidArgument(
            f"Adapter {name!r} is not a plain LoRA adapter (DoRA, LoRA bias are not served)"
        )
    if cfg.get("fan_in_fan_out"):
        raise InvalidArgument(f"Adapter {name!r} uses fan_in_fan_out, which these linear layers do not")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise NotFound(f"Adapter {name!r} has no adapter_model.safetensors in {path}")
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # a truncated or foreign file
        raise InvalidArgument(f"Adapter {name!r}: unreadable weights ({e})") from e
    dec_pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    enc_pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if m := DECODER_KEY.match(key):
            module = m.group(2)
            if module not in DECODER_MODULES:
                raise InvalidArgument(f"Adapter {name!r} adapts decoder module {module}, which is not served")
            dec_pairs.setdefault((int(m.group(1)), module), {})[m.group(3)] = tensor
        elif m := ENCODER_KEY.match(key):
            enc_pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        else:
            raise InvalidArgument(f"Adapter {name!r} has a tensor this model does not have: {key}")
    adapter = LoraAdapter(name, {})

    def weights(where: str, ab: dict[str, torch.Tensor]) -> LoraWeights:
        if set(ab) != {"A", "B"}:
            raise InvalidArgument(f"Adapter {name!r}: {where} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise InvalidArgument(f"Adapter {name!r}: {where} has ranks {a.shape[0]} and {b.shape[1]}")
        adapter.nbytes += (a.numel() + b.numel()) * torch.tensor([], dtype=dtype).element_size()
        return (
            a.to(device, dtype).contiguous(),
            b.to(device, dtype).contiguous(),
            _scale(cfg, where, a.shape[0]),
        )

    for (layer, module), ab in dec_pairs.items():
        adapter.decoder[(layer, module)] = weights(module, ab)
    for module_path, ab in enc_pairs.items():
        adapter.encoder[module_path] = weights(module_path, ab)
    return adapter


def add_lora(
    y: torch.Tensor, x: torch.Tensor, groups: list[tuple[LoraAdapter, torch.Tensor]], key: tuple[int, str]
) -> torch.Tensor:
    """``y`` (T, out) plus each adapter's update on its rows of ``x`` (T, in)."""
    for adapter, rows in groups:
        w = adapter.decoder.get(key)
        if w is None:
            continue
        a, b, scale = w
        y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T, alpha=scale)
    return y


class AdapterStore:
    """Adapters by name, loaded on first use onto the engine's device and dtype; LRU by bytes."""

    def __init__(
        self, resolve: AdapterResolver | None, device: torch.device, dtype: torch.dtype, max_bytes: int
    ) -> None:
        self.resolve = resolve
        self.device, self.dtype = device, dtype
        self.max_bytes = max_bytes
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loader: Callable[[str, Path, torch.device, torch.dtype], LoraAdapter] = load_lora

    def names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._loaded.values())

    def get(self, name: str) -> LoraAdapter:
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        if self.resolve is None:
            raise NotFound(f"Adapter {name!r} is not available: this server has no adapter registry.")
        adapter = self.loader(name, self.resolve(name), self.device, self.dtype)
        if adapter.nbytes > self.max_bytes:
            raise InvalidArgument(
                f"Adapter {name!r} needs {adapter.nbytes / 2**20:.1f} MiB, more than the adapter cache "
                f"({self.max_bytes / 2**20:.1f} MiB)"
            )
        with self._lock:
            self._loaded[name] = adapter
            while sum(a.nbytes for a in self._loaded.values()) > self.max_bytes:
                self._loaded.popitem(last=False)
        return adapter
