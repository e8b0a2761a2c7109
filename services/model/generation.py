"""Batched autoregressive decoding for MiDashengLM (greedy or temperature/top-p sampling).

One prefill over (text + audio) embeddings, then one token per step reusing the KV cache.
Rows that hit a stop token keep emitting padding until every row is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from services.errors import InvalidArgument
from services.model.modeling import CACHE_KW, MiDashengLM, output_cache
from services.model.processor import ModelInputs


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    use_cache: bool = True

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise InvalidArgument(f"max_new_tokens must be within 1..4096, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be within (0, 1], got {self.top_p}.")


def sample_next(
    logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= options.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: MiDashengLM,
    inputs: ModelInputs,
    stop_ids: Sequence[int],
    options: GenerationOptions = GenerationOptions(),
    pad_id: int = 0,
) -> list[list[int]]:
    """Returns each row's new token ids, without the stop token."""
    options.validate()
    inputs = inputs.to(model.device)
    with torch.inference_mode():
        audio_embeds, _ = model.encode_audio(inputs.audio, inputs.audio_lengths)
    return generate_from_audio_embeds(
        model,
        inputs.input_ids,
        inputs.attention_mask,
        audio_embeds,
        inputs.audio_token_counts,
        stop_ids,
        options,
        pad_id,
    )


def generate_from_audio_embeds(
    model: MiDashengLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_token_counts: torch.Tensor,
    stop_ids: Sequence[int],
    options: GenerationOptions = GenerationOptions(),
    pad_id: int = 0,
) -> list[list[int]]:
    """Decode from precomputed audio tokens (A, T5, H): the live path, where the encoder runs elsewhere."""
    rows, _ = generate_with_stops(
        model, input_ids, attention_mask, audio_embeds, audio_token_counts, stop_ids, options, pad_id
    )
    return rows


@torch.inference_mode()
def generate_with_stops(
    model: MiDashengLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_token_counts: torch.Tensor,
    stop_ids: Sequence[int],
    options: GenerationOptions = GenerationOptions(),
    pad_id: int = 0,
) -> tuple[list[list[int]], list[bool]]:
    """:func:`generate_from_audio_embeds`, and for each row whether it ended on a stop token."""
    options.validate()
    dev = model.device
    input_ids, attention = input_ids.to(dev), attention_mask.to(dev)
    embeds = model.embed_inputs(input_ids, audio_embeds.to(dev), audio_token_counts.to(dev))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = embeds.shape[0]
    device = embeds.device
    stop = torch.tensor(list(stop_ids), device=device)
    generator = None
    if options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    decoder = model.decoder
    embed_tokens = decoder.get_input_embeddings()

    cache = DynamicCache(config=decoder.config) if options.use_cache else None
    kwargs = {CACHE_KW: cache} if options.use_cache else {}
    out = decoder(
        inputs_embeds=embeds,
        attention_mask=attention,
        position_ids=positions,
        use_cache=options.use_cache,
        logits_to_keep=1,
        **kwargs,
    )
    last_pos = positions[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    for step in range(options.max_new_tokens):
        nxt = sample_next(out.logits[:, -1, :], options, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, stop)
        if bool(done.all()) or step == options.max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        last_pos = last_pos + 1
        if options.use_cache:
            kwargs = {CACHE_KW: output_cache(out)}
            out = decoder(
                input_ids=nxt[:, None],
                attention_mask=attention,
                position_ids=last_pos[:, None],
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        else:
            embeds = torch.cat([embeds, embed_tokens(nxt[:, None])], dim=1)
            positions = torch.cat([positions, last_pos[:, None]], dim=1)
            out = decoder(
                inputs_embeds=embeds,
                attention_mask=attention,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
            )

    result: list[list[int]] = []
    stopped: list[bool] = []
    stacked = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(batch)]
    stop_set = set(int(s) for s in stop_ids)
    for row in stacked:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        result.append(row[:cut])
        stopped.append(cut < len(row))
    return result, stopped
