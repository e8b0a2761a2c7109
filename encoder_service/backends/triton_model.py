"""The Dasheng encoder as a Triton Python-backend model.

``midasheng triton-repo`` copies this file verbatim into a model repository as
``<name>/<version>/model.py``, beside the checkpoint's audio weights (``model.safetensors``) and
``config.json``. Inside ``tritonserver`` it puts this project on ``sys.path`` (the
``project_root`` parameter of ``config.pbtxt``), loads the weights with the project's own loader
(:func:`services.model.checkpoint.load_model`) and runs every batch that Triton's dynamic batcher
forms through :func:`services.streaming.encoder.run_jobs` — the code of the ``torch`` backend.

The interface (names shared with the client in :mod:`.triton_backend`):

* ``MEL`` FP32 ``[n_mels, window_frames]``: a window's log-mel, padded to the full window (so
  requests from every encoder front have one shape and batch together; the padding is ignored);
* ``FRAMES`` INT32 ``[1]``: the window's real frames (1..window_frames);
* ``VALID_PATCHES`` INT32 ``[1]``: its patches that hold audio (keys beyond are masked);
* ``FEATURES`` FP32 ``[window_patches, embed_dim]``: its features, zero past ``FRAMES // 4``.

``triton_python_backend_utils`` exists only inside tritonserver, so it is imported there only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

MEL = "MEL"
FRAMES = "FRAMES"
VALID_PATCHES = "VALID_PATCHES"
FEATURES = "FEATURES"
PROJECT_ROOT_PARAM = "project_root"  # directory that holds the ``services`` package
DTYPE_PARAM = "dtype"  # weights dtype: float32 or bfloat16
ENCODER_CONFIG_PARAM = "encoder_config"  # the checkpoint's audio_encoder_config (JSON), checked by clients


def parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """``config.pbtxt`` parameters (as parsed into JSON by Triton) as a plain dict."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def encode_rows(encoder: Any, mel: np.ndarray, frames: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B, n_mels, W) padded mels, (B,) real frames and (B,) valid patches -> (B, W // 4, D) fp32.

    Row ``i`` gets exactly what :func:`run_jobs` gives its window ``mel[i, :, :frames[i]]``, zero
    beyond its ``frames[i] // 4`` patches."""
    import torch

    from encoder_service.backends.base import Window
    from services.streaming.encoder import run_jobs

    cfg = encoder.cfg
    windows = [
        Window(torch.from_numpy(np.ascontiguousarray(mel[i, :, : int(frames[i])])), int(valid[i]))
        for i in range(mel.shape[0])
    ]
    out = np.zeros((mel.shape[0], mel.shape[2] // cfg.patch_frames, cfg.embed_dim), dtype=np.float32)
    for i, f in enumerate(run_jobs(encoder, windows)):  # (P_i, D) each
        out[i, : f.shape[0]] = f.float().cpu().numpy()
    return out


def check_rows(mel: np.ndarray, frames: np.ndarray, valid: np.ndarray, patch_frames: int) -> str | None:
    """Why a request's rows cannot be encoded, or None."""
    width = mel.shape[2]
    if frames.shape != (mel.shape[0], 1) or valid.shape != (mel.shape[0], 1):
        return f"{FRAMES} and {VALID_PATCHES} must be [batch, 1], got {frames.shape} and {valid.shape}"
    if (frames < 1).any() or (frames > width).any():
        return f"{FRAMES} must be within 1..{width}, got {frames.ravel().tolist()}"
    if (valid < 0).any() or (valid > width // patch_frames).any():
        return f"{VALID_PATCHES} must be within 0..{width // patch_frames}, got {valid.ravel().tolist()}"
    if not np.isfinite(mel).all():
        return f"{MEL} holds NaN or infinite values"
    return None


class TritonPythonModel:
    """Triton's Python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = parameters(config)
        root = params.get(PROJECT_ROOT_PARAM, "")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        from services.model.checkpoint import load_model

        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        version_dir = Path(args["model_repository"]) / args["model_version"]
        model = load_model(
            version_dir, dtype=params.get(DTYPE_PARAM) or "float32", device=device, audio_only=True
        )
        self.encoder = model.audio_encoder.eval()
        del model  # the projector runs in the encoder service

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses: list[Any] = [None] * len(requests)
        rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for k, request in enumerate(requests):
            mel = pb_utils.get_input_tensor_by_name(request, MEL).as_numpy()
            frames = pb_utils.get_input_tensor_by_name(request, FRAMES).as_numpy()
            valid = pb_utils.get_input_tensor_by_name(request, VALID_PATCHES).as_numpy()
            problem = check_rows(mel, frames, valid, self.encoder.cfg.patch_frames)
            if problem is not None:  # fails this request only
                responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
            else:
                rows.append((k, mel, frames, valid))
        if rows:
            feats = encode_rows(
                self.encoder,
                np.concatenate([r[1] for r in rows]),
                np.concatenate([r[2] for r in rows]).ravel(),
                np.concatenate([r[3] for r in rows]).ravel(),
            )
            start = 0
            for k, mel, _, _ in rows:
                part = feats[start : start + mel.shape[0]]
                start += mel.shape[0]
                responses[k] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(FEATURES, part)])
        return responses

    def finalize(self) -> None:
        del self.encoder
