"""The in-process backend: the checkpoint's Dasheng encoder on this process's device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from encoder_service.backends.base import EncoderGeometry
from services.model.dasheng import DashengEncoder
from services.streaming.encoder import EncoderWindow, run_jobs


class TorchBackend:
    """:func:`services.streaming.encoder.run_jobs` on one device, one batch at a time."""

    name = "torch"
    max_in_flight = 1  # one device thread: batches queue in the micro-batcher, not on the device

    def __init__(self, encoder: DashengEncoder) -> None:
        self.encoder = encoder.eval()
        self.geometry = EncoderGeometry.of(encoder.cfg)

    def encode(self, windows: Sequence[EncoderWindow]) -> list[torch.Tensor]:
        self.geometry.check(windows)
        return run_jobs(self.encoder, windows)

    def close(self) -> None:
        pass
