"""The encoder backend seam: "encode these log-mel windows with these valid patch lengths".

The streaming sessions, the micro-batcher and ``EncodeClip`` use only :class:`EncoderBackend`.
A backend runs Dasheng and nothing else: the log-mel frontend runs per session (it keeps the
stream's state) and the projector runs where windows are stitched (a 5-patch token can straddle
two encoder windows), both in the encoder service.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from services.model.config import EncoderConfig
from services.streaming.encoder import EncoderWindow


@dataclass(frozen=True)
class EncoderGeometry:
    """The shapes a backend takes and gives (the checkpoint's encoder config decides them)."""

    n_mels: int  # mel bins per frame
    window_frames: int  # mel frames per attention window (10.08 s)
    patch_frames: int  # mel frames per patch (40 ms)
    embed_dim: int  # features per patch

    @property
    def window_patches(self) -> int:
        return self.window_frames // self.patch_frames

    @classmethod
    def of(cls, cfg: EncoderConfig) -> EncoderGeometry:
        return cls(cfg.n_mels, cfg.target_length, cfg.patch_frames, cfg.embed_dim)

    def check(self, windows: Sequence[EncoderWindow]) -> None:
        """Every window must fit one attention window (ValueError otherwise)."""
        for w in windows:
            n_mels, frames = w.mel.shape
            if n_mels != self.n_mels or not 0 < frames <= self.window_frames:
                raise ValueError(
                    f"a window mel of shape {tuple(w.mel.shape)} does not fit one encoder window "
                    f"({self.n_mels} mels, 1..{self.window_frames} frames)"
                )
            if not 0 <= w.valid_patches <= self.window_patches:
                raise ValueError(f"valid_patches {w.valid_patches} outside 0..{self.window_patches}")


@dataclass(eq=False)
class Window:
    """A window that belongs to no streaming session (a window of a clip, a benchmark's window)."""

    mel: torch.Tensor  # (n_mels, T) fp32
    valid_patches: int


class EncoderBackend(Protocol):
    """Runs the Dasheng encoder on batches of windows; safe to call from ``max_in_flight`` threads."""

    name: str
    geometry: EncoderGeometry
    max_in_flight: int  # batches that may run at once (1: one device thread)

    def encode(self, windows: Sequence[EncoderWindow]) -> list[torch.Tensor]:
        """Each window's (T // patch_frames, embed_dim) features, equal to encoding it alone
        (within the backend's stated tolerance), whatever else is in the batch."""
        ...

    def close(self) -> None: ...
