"""Whole clips through the encoder backend (``EncodeClip``): the same windows, batcher and backend
as live sessions, so a clip's tokens equal ``MiDashengLM.encode_audio`` (see ``docs/encoders.md``)."""

from __future__ import annotations

import numpy as np
import torch

from encoder_service.backends.base import Window
from encoder_service.batcher import EncoderBatcher
from services.model.modeling import MiDashengLM
from services.model.processor import prepare_audio

CLIP_TIMEOUT_S = 60.0  # longest wait for a clip's windows (a 16 MiB request is ~4 min of audio)


def clip_windows(mel: torch.Tensor, valid: int, window_frames: int, patch_frames: int) -> list[Window]:
    """Split a clip's (n_mels, T) log-mel into attention windows, with ``valid`` real patches in all.

    The offline encoder attends within each window, keys masked beyond the clip's valid patches:
    window ``w`` holds ``clamp(valid - w * window_patches, 0, window_patches)`` of them."""
    per = window_frames // patch_frames
    return [
        Window(mel[:, start : start + window_frames], max(0, min(valid - w * per, per)))
        for w, start in enumerate(range(0, mel.shape[1], window_frames))
        if mel.shape[1] - start >= patch_frames  # a trailing frame or three make no patch
    ]


def encode_clip(
    model: MiDashengLM, batcher: EncoderBatcher, samples: np.ndarray, encoder_only: bool = False
) -> torch.Tensor:
    """(P, D) encoder features, or (token_count, H) projector outputs, of a 16 kHz mono clip."""
    wav = prepare_audio(samples)
    enc = model.config.audio_encoder_config
    front_end = model.audio_encoder.front_end
    with torch.inference_mode():
        mel = front_end.log_mel(wav)  # (n_mels, 1 + N // hop) fp32, on the CPU
        valid = (mel.shape[1] - 1) // enc.patch_frames
        windows = clip_windows(mel, valid, enc.target_length, enc.patch_frames)
        feats = torch.cat(batcher.run(windows, timeout=CLIP_TIMEOUT_S))  # (P, D)
        if encoder_only:
            return feats
        weight = next(model.audio_projector.parameters())
        x = feats.to(device=weight.device, dtype=weight.dtype)[None]
        tokens, _ = model.audio_projector(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        return tokens[0, : model.token_count(wav.numel())]
