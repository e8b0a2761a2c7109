"""Dasheng audio encoder (ViT over log-mel patches), checkpoint-compatible with MiDashengLM.

Shapes: log-mel (B, 64, T) at 100 Hz -> patches of 64 mels x 4 frames (40 ms, 25 Hz)
-> non-overlapping attention windows of ``target_length`` frames (1008 = 10.08 s,
252 patches), each attended on its own with positions restarting at 0 -> (B, P, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.model.config import EncoderConfig
from services.model.frontend import LogMelFrontend


class Fp32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that stays fp32 when the model is cast (the reference warns fp16/bf16 gives NaN)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("weight", "bias"):
            p = getattr(self, name)
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for name in ("running_mean", "running_var"):
            b = getattr(self, name)
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                setattr(self, name, b.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        kernel = (cfg.patch_size[0], cfg.patch_size[1])
        stride = (cfg.patch_stride[0], cfg.patch_stride[1])
        self.proj = nn.Conv2d(cfg.input_channels, cfg.embed_dim, kernel_size=kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, 1, F, T) -> (B, D, 1, T // 4)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # rows stacked [q; k; v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, S, hd) each
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S), True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale = hd ** -0.5
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm ViT layout, no LayerScale)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def valid_patches(frames: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    """Patches that hold only real audio: floor(samples / 640) = (frames - 1) // 4."""
    return (frames - 1) // cfg.patch_frames


class DashengEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.front_end = LogMelFrontend(cfg)
        self.init_bn = Fp32BatchNorm2d(cfg.n_mels, momentum=0.01)
        self.patch_embed = PatchEmbed(cfg)
        d = cfg.embed_dim
        self.time_pos_embed = nn.Parameter(torch.randn(1, d, 1, cfg.window_patches) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, d, cfg.n_mels // cfg.patch_size[0], 1) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def embed_patches(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) fp32 log-mel -> (B, T // 4, D) patch embeddings without positions."""
        x = self.init_bn(mel.unsqueeze(2))  # (B, F, 1, T): BN over the mel bins
        x = x.transpose(1, 2).to(self.patch_embed.proj.weight.dtype)  # (B, 1, F, T)
        x = self.patch_embed(x)  # (B, D, 1, P)
        return x.flatten(2).transpose(1, 2)  # (B, P, D)

    def forward(self, mel: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, T) log-mel and valid frames (B,) -> ((B, P, D) features, (B, P) valid mask)."""
        return self.encode_patches(mel, valid_patches(frames, self.cfg))

    def encode_patches(
        self, mel: torch.Tensor, patch_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward` with the number of valid patches per item given directly.

        Windows of every item are stacked into one batch; each attends only within itself.
        """
        x = self.embed_patches(mel)  # (B, P, D)
        b, p, d = x.shape
        w = self.cfg.window_patches
        n_win = max(1, -(-p // w))
        x = F.pad(x, (0, 0, 0, n_win * w - p)).reshape(b * n_win, w, d)
        pos = self.time_pos_embed[0, :, 0, :].T + self.freq_pos_embed[0, :, 0, 0]  # (w, D)
        x = x + pos.unsqueeze(0)
        valid = torch.arange(n_win * w, device=x.device)[None, :] < patch_lengths.to(x.device)[:, None]
        key_mask = valid.reshape(b * n_win, w)
        # A window with no real audio attends to everything: finite garbage that is masked later,
        # instead of a softmax over nothing (NaN).
        key_mask = key_mask | ~key_mask.any(dim=1, keepdim=True)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.norm(x).reshape(b, n_win * w, d)[:, :p]
        return x, valid[:, :p]

    def forward_audio(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) fp32 waveforms + lengths in samples -> encoder features and mask."""
        mel, frames = self.front_end(wav, lengths)
        return self(mel, frames)
