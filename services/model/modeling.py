"""MiDashengLM: Dasheng encoder -> 5x frame-stacking projector -> Qwen2 or Qwen3 decoder.

Module names match the published checkpoints: ``audio_encoder.*``, ``audio_projector.net.*``,
``decoder.model.*`` / ``decoder.lm_head.*``. The decoder class follows ``text_config.model_type``
(:attr:`MiDashengLMConfig.decoder_family`): ``Qwen2ForCausalLM`` for MiDashengLM-7B,
``Qwen3ForCausalLM`` (tied ``lm_head``) for MiDashengLM-0.6B.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from services.errors import InvalidArgument
from services.model.config import MiDashengLMConfig
from services.model.dasheng import DashengEncoder

Decoder = Qwen2ForCausalLM | Qwen3ForCausalLM
# With tied embeddings the checkpoint holds no lm_head: it is the embedding matrix.
LM_HEAD_KEY = "decoder.lm_head.weight"
EMBED_KEY = "decoder.model.embed_tokens.weight"

# transformers 5.24 renamed the decoder's cache keyword (``past_key_values`` -> ``cache``);
# older 5.x releases only know the old name. Both families come from the same release.
_CACHE_KWS = {
    "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    for cls in (Qwen2ForCausalLM, Qwen3ForCausalLM)
}
if len(_CACHE_KWS) != 1:
    raise ImportError(f"transformers' decoder families disagree on the cache keyword: {_CACHE_KWS}")
CACHE_KW = _CACHE_KWS.pop()


def output_cache(out: Any) -> Any:
    return getattr(out, "cache", None) if CACHE_KW == "cache" else out.past_key_values


class AudioProjector(nn.Module):
    """Stacks ``k`` consecutive 25 Hz encoder frames into one 5 Hz token: (B, T, D) -> (B, T//k, H)."""

    def __init__(self, in_dim: int, out_dim: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(in_dim * k, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        n = t // self.k  # trailing t % k frames are dropped
        x = x[:, : n * self.k].reshape(b, n, d * self.k)  # (B, T/5, 5*D)
        mask = mask[:, : n * self.k].reshape(b, n, self.k).any(dim=-1)  # valid if any frame is
        return self.net(x), mask


def num_audio_tokens(num_samples: int, hop_length: int = 160, patch_frames: int = 4, k: int = 5) -> int:
    """5 Hz audio tokens for a clip: int(1 + samples / 160) // 4 // 5, at least 1."""
    return max(1, int(1 + num_samples / hop_length) // patch_frames // k)


def build_decoder(config: MiDashengLMConfig) -> Decoder:
    """The decoder ``text_config.model_type`` names: Qwen3 for ``qwen3``, else Qwen2 (Qwen2.5-Omni text)."""
    text_cfg = config.decoder_config()
    text_cfg._attn_implementation = "sdpa"
    if isinstance(text_cfg, Qwen3Config):
        return Qwen3ForCausalLM(text_cfg)
    return Qwen2ForCausalLM(text_cfg)


class MiDashengLM(nn.Module):
    def __init__(self, config: MiDashengLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        enc = config.audio_encoder_config
        self.audio_encoder = DashengEncoder(enc)
        self.audio_projector = AudioProjector(enc.embed_dim, config.hidden_size, config.subsample_factor)
        self.decoder: Decoder = build_decoder(config)

    def tied_keys(self) -> dict[str, str]:
        """State-dict keys that alias another key's tensor (not stored in a checkpoint) -> that key."""
        return {LM_HEAD_KEY: EMBED_KEY} if self.config.tie_word_embeddings else {}

    @property
    def dtype(self) -> torch.dtype:
        return self.audio_encoder.patch_embed.proj.weight.dtype  # never a LoRA target, always loaded

    @property
    def device(self) -> torch.device:
        return self.audio_encoder.patch_embed.proj.weight.device

    def token_count(self, num_samples: int) -> int:
        enc = self.config.audio_encoder_config
        return num_audio_tokens(num_samples, enc.hop_length, enc.patch_frames, self.config.subsample_factor)

    def encode_audio(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) waveforms (fp32, 16 kHz) + lengths -> ((B, T5, H) audio tokens, (B, T5) mask)."""
        feats, mask = self.audio_encoder.forward_audio(audio.float(), lengths)
        return self.audio_projector(feats, mask)

    def embed_inputs(
        self, input_ids: torch.Tensor, audio_embeds: torch.Tensor, audio_token_counts: torch.Tensor
    ) -> torch.Tensor:
        """Text embeddings with the i-th audio's first N tokens written at its ``<|AUDIO|>`` positions."""
        embeds = self.decoder.get_input_embeddings()(input_ids)  # (B, S, H)
        is_audio = input_ids == self.config.audio_token_id
        take = (
            torch.arange(audio_embeds.shape[1], device=input_ids.device)[None, :]
            < audio_token_counts[:, None]
        )
        n_slots, n_tokens = int(is_audio.sum()), int(take.sum())
        if n_slots != n_tokens:
            raise InvalidArgument(
                f"The prompt holds {n_slots} audio placeholder tokens but the audio gives {n_tokens} tokens; "
                "expand <|AUDIO|> with the processor."
            )
        return embeds.masked_scatter(is_audio.unsqueeze(-1), audio_embeds[take].to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        audio_token_counts: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """Teacher-forced forward; with ``labels`` (-100 = ignored) the output carries the loss."""
        audio_embeds, _ = self.encode_audio(audio, audio_lengths)
        embeds = self.embed_inputs(input_ids, audio_embeds, audio_token_counts)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            labels=labels,
            use_cache=False,
        )
