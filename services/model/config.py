"""MiDashengLM configuration in the published ``config.json`` schema.

The checkpoint's ``config.json`` has ``model_type: "midashenglm"`` with three parts:
``audio_encoder_config`` (the Dasheng encoder and its mel frontend), ``subsample_factor``
(the projector's frame stacking) and ``text_config``, the decoder. Two decoder families are
published: MiDashengLM-7B's Qwen2.5-Omni thinker text config (numerically a Qwen2 decoder) and
MiDashengLM-0.6B's Qwen3 config (q/k RMSNorm, tied embeddings); ``text_config.model_type``
picks one (``docs/models.md``). This module reads and writes that schema and validates it in
one place.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Qwen2Config, Qwen3Config

from services.constants import ENCODER_WINDOW_FRAMES, HOP_LENGTH, SAMPLE_RATE
from services.errors import ConfigError

MODEL_TYPE = "midashenglm"
ENCODER_MODEL_TYPE = "midashenglm_dasheng_encoder"
# text_config.model_type -> decoder family. The Qwen2.5-Omni thinker text model is numerically a
# Qwen2 decoder with 1-D rotary positions; MiDashengLM-0.6B's decoder is a plain Qwen3.
DECODER_FAMILIES = {
    "qwen2": "qwen2",
    "qwen2_5_omni_text": "qwen2",
    "qwen2_5_omni_thinker_text": "qwen2",
    "qwen3": "qwen3",
}
TEXT_MODEL_TYPES = tuple(DECODER_FAMILIES)

# Keys of a text config that the decoder uses; the rest (M-RoPE sections, vision/audio fields of
# the Omni thinker) do not change the computation for text-only 1-D positions.
_QWEN2_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Qwen3 adds an explicit head_dim (0.6B: 128, not hidden/heads = 64) and optional q/k/v/o bias.
_QWEN3_KEYS = (*_QWEN2_KEYS, "head_dim", "attention_bias")


def decoder_family(text_config: dict[str, Any]) -> str:
    """The decoder family of a ``text_config``; :class:`ConfigError` for an unsupported model type."""
    model_type = text_config.get("model_type", "qwen2")
    try:
        return DECODER_FAMILIES[model_type]
    except KeyError:
        raise ConfigError(
            f"text_config.model_type {model_type!r} is not supported; expected one of {TEXT_MODEL_TYPES}."
        ) from None


@dataclass(frozen=True)
class EncoderConfig:
    """Dasheng encoder and its log-mel frontend (field names as in the published config)."""

    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    patch_size: tuple[int, int] = (64, 4)
    patch_stride: tuple[int, int] = (64, 4)
    target_length: int = ENCODER_WINDOW_FRAMES  # frames per attention window (10.08 s)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    input_channels: int = 1
    sample_rate: int = SAMPLE_RATE  # Hz
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = HOP_LENGTH  # samples per mel frame (10 ms)
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    center: bool = True

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if tuple(self.patch_size) != tuple(self.patch_stride):
            raise ConfigError("Only non-overlapping patches (patch_size == patch_stride) are supported.")
        if self.patch_size[0] != self.n_mels:
            raise ConfigError(f"patch_size[0] {self.patch_size[0]} must cover all {self.n_mels} mel bins.")
        if self.target_length % self.patch_size[1]:
            raise ConfigError(
                f"target_length {self.target_length} must be a multiple of the patch width {self.patch_size[1]}."
            )
        if self.init_values is not None:
            raise ConfigError("LayerScale (init_values) is not used by MiDashengLM and is not supported.")
        if self.sample_rate != SAMPLE_RATE:
            raise ConfigError(f"The encoder expects 16 kHz audio, config says {self.sample_rate} Hz.")

    @property
    def patch_frames(self) -> int:
        """Mel frames per patch (4 frames = 40 ms)."""
        return self.patch_size[1]

    @property
    def window_patches(self) -> int:
        """Patches per attention window (252 for 10.08 s)."""
        return self.target_length // self.patch_size[1]

    @property
    def samples_per_patch(self) -> int:
        """Audio samples per encoder frame (640 = 40 ms)."""
        return self.hop_length * self.patch_size[1]


@dataclass(frozen=True)
class MiDashengLMConfig:
    """The whole model: encoder, projector stacking factor and the decoder's text config."""

    audio_encoder_config: EncoderConfig = field(default_factory=EncoderConfig)
    subsample_factor: int = 5
    text_config: dict[str, Any] = field(default_factory=dict)
    audio_token_id: int = 151646
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys, written back on save

    def validate(self) -> None:
        self.audio_encoder_config.validate()
        if self.subsample_factor < 1:
            raise ConfigError("subsample_factor must be at least 1.")
        decoder_family(self.text_config)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in self.text_config:
                raise ConfigError(f"text_config is missing {key!r}.")
        if not 0 <= self.audio_token_id < int(self.text_config["vocab_size"]):
            raise ConfigError(f"audio_token_id {self.audio_token_id} is outside the vocabulary.")

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def samples_per_token(self) -> int:
        """Audio samples per 5 Hz audio token (3200 = 200 ms)."""
        return self.audio_encoder_config.samples_per_patch * self.subsample_factor

    @property
    def decoder_family(self) -> str:
        """``"qwen2"`` (MiDashengLM-7B, Qwen2.5-Omni text) or ``"qwen3"`` (MiDashengLM-0.6B)."""
        return decoder_family(self.text_config)

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether ``lm_head`` shares ``embed_tokens``' weight (then checkpoints hold no lm_head)."""
        return bool(self.text_config.get("tie_word_embeddings", False))

    def decoder_config(self) -> Qwen2Config | Qwen3Config:
        """The decoder config as transformers' ``Qwen2Config`` or ``Qwen3Config`` (1-D RoPE)."""
        tc = self.text_config
        family = self.decoder_family
        kwargs = {k: tc[k] for k in (_QWEN3_KEYS if family == "qwen3" else _QWEN2_KEYS) if k in tc}
        rope = tc.get("rope_parameters") or {}
        kwargs["rope_theta"] = float(rope.get("rope_theta", tc.get("rope_theta", 1_000_000.0)))
        kwargs["tie_word_embeddings"] = self.tie_word_embeddings
        kwargs.setdefault("sliding_window", None)
        if family == "qwen3":
            return Qwen3Config(**kwargs)
        return Qwen2Config(**kwargs)

    # --- (de)serialisation in the published schema -------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiDashengLMConfig:
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(
                f"config.json has model_type {data.get('model_type')!r}, expected {MODEL_TYPE!r}."
            )
        enc_raw = dict(data.get("audio_encoder_config") or {})
        known = {f.name for f in dataclasses.fields(EncoderConfig)}
        enc_kwargs: dict[str, Any] = {k: v for k, v in enc_raw.items() if k in known}
        for key in ("patch_size", "patch_stride"):
            if key in enc_kwargs:
                enc_kwargs[key] = tuple(enc_kwargs[key])
        text_config = dict(data.get("text_config") or {})
        own = {"audio_encoder_config", "subsample_factor", "text_config", "audio_token_id", "model_type"}
        cfg = cls(
            audio_encoder_config=EncoderConfig(**enc_kwargs),
            subsample_factor=int(data.get("subsample_factor", 5)),
            text_config=text_config,
            audio_token_id=int(data.get("audio_token_id", 151646)),
            extra={k: v for k, v in data.items() if k not in own},
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        enc = dataclasses.asdict(self.audio_encoder_config)
        enc["patch_size"] = list(enc["patch_size"])
        enc["patch_stride"] = list(enc["patch_stride"])
        enc["model_type"] = ENCODER_MODEL_TYPE
        out: dict[str, Any] = {"architectures": ["MiDashengLMModel"], "model_type": MODEL_TYPE}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures", "model_type")})
        out.update(
            {
                "audio_encoder_config": enc,
                "subsample_factor": self.subsample_factor,
                "text_config": self.text_config,
                "audio_token_id": self.audio_token_id,
            }
        )
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> MiDashengLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"No config.json at {path}.") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")


def real_7b_config() -> MiDashengLMConfig:
    """The published MiDashengLM-7B configuration (Dasheng 0.6B + Qwen2.5-7B-class decoder)."""
    text_config = {
        "model_type": "qwen2_5_omni_text",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
    }
    return MiDashengLMConfig(
        audio_encoder_config=EncoderConfig(),
        subsample_factor=5,
        text_config=text_config,
        audio_token_id=151646,
    )


def real_0_6b_config() -> MiDashengLMConfig:
    """The MiDashengLM-0.6B configuration (``mispeech/midashenglm-0.6b-fp32``): Dasheng 0.6B +
    a Qwen3-0.6B decoder.

    ``text_config`` is the published Qwen3-0.6B text config (head_dim 128 with 16 heads of a
    1024-wide model, q/k RMSNorm, no attention bias, tied embeddings). Inferred, not read: the
    MiDashengLM-0.6B ``config.json`` itself was not available offline, so the audio encoder
    (the same Dasheng 0.6B as the 7B: :class:`EncoderConfig` defaults), ``subsample_factor`` 5
    and ``audio_token_id`` 151646 are taken from the 7B; verify them against the real file.
    """
    text_config = {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    return MiDashengLMConfig(
        audio_encoder_config=EncoderConfig(),
        subsample_factor=5,
        text_config=text_config,
        audio_token_id=151646,
    )


def tiny_config(
    vocab_size: int = 512,
    audio_token_id: int = 4,
    encoder_dim: int = 64,
    encoder_depth: int = 2,
    encoder_heads: int = 4,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
) -> MiDashengLMConfig:
    """A tiny model in the same architecture (Qwen2 decoder), for tests and the demo model."""
    text_config: dict[str, Any] = {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10_000.0,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
    }
    return MiDashengLMConfig(
        audio_encoder_config=EncoderConfig(
            embed_dim=encoder_dim, depth=encoder_depth, num_heads=encoder_heads
        ),
        subsample_factor=5,
        text_config=text_config,
        audio_token_id=audio_token_id,
    )


def tiny_qwen3_config(**sizes: int) -> MiDashengLMConfig:
    """:func:`tiny_config` (same ``sizes`` keywords) with a MiDashengLM-0.6B-shaped Qwen3 decoder:
    q/k RMSNorm, no attention bias, tied embeddings, and a ``head_dim`` of 2 x hidden/heads (as
    in Qwen3-0.6B: 128 for 1024/16) so that a head size taken from hidden/heads cannot pass."""
    cfg = tiny_config(**sizes)
    text_config = dict(cfg.text_config)
    text_config.update(
        model_type="qwen3",
        head_dim=2 * text_config["hidden_size"] // text_config["num_attention_heads"],
        attention_bias=False,
        tie_word_embeddings=True,
    )
    return dataclasses.replace(cfg, text_config=text_config)
