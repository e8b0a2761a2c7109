"""The decoder's forward pass over a paged KV pool, for a packed batch of many sequences.

Every sequence in a step contributes ``n_i`` new tokens (a prefill chunk, one decode token, or
the last prompt tokens plus a draft to verify) at absolute positions ``start_i .. start_i + n_i``.
The new tokens of all sequences are packed into one (T, H) tensor for the linear layers; their
keys and values are written into the pool at the sequences' slots; attention gathers each
sequence's cached keys and values from its blocks and runs as one padded SDPA call with a causal
mask per sequence. The weights are the HF decoder's own modules (Qwen2 and Qwen3 layouts), so
numbers match ``transformers``' forward for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lm_service.engines.kv import KVGeometry, KVPool
from lm_service.engines.lora import LoraAdapter, add_lora


@dataclass
class StepInputs:
    """One step's packed inputs (host-built index tensors, moved to the device once)."""

    embeds: torch.Tensor  # (T, H) input embeddings of the new tokens, packed
    positions: torch.Tensor  # (T,) absolute positions
    write_slots: torch.Tensor  # (T,) where each new token's K/V goes
    q_index: torch.Tensor  # (B, Q) packed row of each sequence's i-th new token (0 where padded)
    q_valid: torch.Tensor  # (B, Q) bool
    kv_slots: torch.Tensor  # (B, K) slot of each sequence's j-th context token (0 where padded)
    mask: torch.Tensor  # (B, 1, Q, K) bool: may query i of sequence b see key j
    logit_rows: torch.Tensor  # (R,) packed rows whose next-token logits are wanted
    lora_groups: list[tuple[LoraAdapter, torch.Tensor]]  # adapter -> its packed rows


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PagedDecoder:
    """Runs a ``Qwen2ForCausalLM``/``Qwen3ForCausalLM``'s weights over a :class:`KVPool`."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder: Any = cast(
            Any, decoder
        )  # Qwen2ForCausalLM / Qwen3ForCausalLM, read through their modules
        self.model: Any = self.decoder.model
        cfg: Any = self.decoder.config
        attn = self.model.layers[0].self_attn
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.hidden_size = int(cfg.hidden_size)
        self.has_qk_norm = hasattr(attn, "q_norm")
        weight: torch.Tensor = self.model.embed_tokens.weight
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype

    def geometry(self) -> KVGeometry:
        return KVGeometry(len(self.model.layers), self.num_kv_heads, self.head_dim, self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.embed_tokens(ids)
        return out

    @torch.inference_mode()
    def forward(self, pool: KVPool, inp: StepInputs) -> torch.Tensor:
        """Writes the new tokens' K/V into ``pool``; returns (R, V) logits of ``logit_rows``."""
        x = inp.embeds
        t = x.shape[0]
        cos, sin = self.model.rotary_emb(x[None], inp.positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # (T, 1, hd)
        groups = inp.lora_groups
        b, q_len = inp.q_index.shape
        flat_q = inp.q_index.reshape(-1)
        out_rows = inp.q_valid.reshape(-1).nonzero().squeeze(-1)  # padded (B*Q) rows holding real tokens
        for li, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = add_lora(attn.q_proj(h), h, groups, (li, "q_proj")).view(t, self.num_heads, self.head_dim)
            k = add_lora(attn.k_proj(h), h, groups, (li, "k_proj")).view(t, self.num_kv_heads, self.head_dim)
            v = add_lora(attn.v_proj(h), h, groups, (li, "v_proj")).view(t, self.num_kv_heads, self.head_dim)
            if self.has_qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            pool.k[li].index_copy_(0, inp.write_slots, k)
            pool.v[li].index_copy_(0, inp.write_slots, v)
            keys = pool.k[li][inp.kv_slots].transpose(1, 2)  # (B, kvh, K, hd)
            values = pool.v[li][inp.kv_slots].transpose(1, 2)
            queries = (
                q[flat_q].view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
            )  # (B, nh, Q, hd)
            o = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=inp.mask, scale=self.scaling, enable_gqa=True
            )  # (B, nh, Q, hd)
            o = o.transpose(1, 2).reshape(b * q_len, self.num_heads * self.head_dim)[out_rows]  # (T, nh*hd)
            x = x + add_lora(attn.o_proj(o), o, groups, (li, "o_proj"))
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            gate = add_lora(mlp.gate_proj(h), h, groups, (li, "gate_proj"))
            up = add_lora(mlp.up_proj(h), h, groups, (li, "up_proj"))
            act = mlp.act_fn(gate) * up
            x = x + add_lora(mlp.down_proj(act), act, groups, (li, "down_proj"))
        hidden = self.model.norm(x.index_select(0, inp.logit_rows))
        logits: torch.Tensor = self.decoder.lm_head(hidden)
        return logits
