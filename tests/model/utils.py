"""Helpers shared by the model tests (signals, tiny-model construction)."""

from __future__ import annotations

import numpy as np
import torch

SR = 16000
CAPTIONS = ["A steady low tone.", "Pink noise, then silence.", "A rising sweep with clicks."]
PROMPTS = ["Caption the audio."]


def make_wave(seconds: float, seed: int, amp: float = 0.1) -> np.ndarray:
    """Deterministic test clip: two sines plus noise, float32, 16 kHz."""
    n = int(round(seconds * SR))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f1, f2 = 200.0 + 50 * seed, 1500.0 + 100 * seed
    x = 0.5 * np.sin(2 * np.pi * f1 * t) + 0.3 * np.sin(2 * np.pi * f2 * t) + 0.2 * rng.standard_normal(n)
    return (amp * x).astype(np.float32)


def sine(seconds: float, freq: float, amp: float) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def batch_audio(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad clips with zeros into (B, N) plus lengths (B,)."""
    n = max(len(w) for w in waves)
    audio = torch.zeros(len(waves), n)
    for i, w in enumerate(waves):
        audio[i, : len(w)] = torch.from_numpy(w)
    return audio, torch.tensor([len(w) for w in waves], dtype=torch.long)
