"""MiDashengLM: Dasheng encoder -> 5x frame-stacking projector -> Qwen2 decoder.

Module names match the published checkpoint: ``audio_encoder.*``, ``audio_projector.net.*``,
``decoder.model.*`` / ``decoder.lm_head.*``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from services.errors import InvalidArgument
from services.model.config import MiDashengLMConfig
from services.model.dasheng import DashengEncoder

# transformers 5.24 renamed the decoder's cache keyword (``past_key_values`` -> ``cache``);
# older 5.x releases only know the old name.
_FORWARD_PARAMS = inspect.signature(Qwen2ForCausalLM.forward).parameters
CACHE_KW = "cache" if "cache" in _FORWARD_PARAMS else "past_key_values"


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


class MiDashengLM(nn.Module):
    def __init__(self, config: MiDashengLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        enc = config.audio_encoder_config
        self.audio_encoder = DashengEncoder(enc)
        self.audio_projector = AudioProjector(enc.embed_dim, config.hidden_size, config.subsample_factor)
        text_cfg = config.qwen2_config()
        text_cfg._attn_implementation = "sdpa"
        self.decoder = Qwen2ForCausalLM(text_cfg)

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
