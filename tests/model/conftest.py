"""Shared, expensive-ish fixtures for the model tests: tiny tokenizer, model, processor, checkpoint.

``tiny_*`` is the Qwen2 family (MiDashengLM-7B's decoder); ``tiny_qwen3_*`` the Qwen3 family
(MiDashengLM-0.6B's: q/k RMSNorm, tied embeddings), over the same tokenizer and encoder sizes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from services.model.checkpoint import build_model, save_model
from services.model.config import MiDashengLMConfig, tiny_config, tiny_qwen3_config
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor
from services.training.tokenizer import train_caption_tokenizer
from tests.model.utils import CAPTIONS, PROMPTS


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_caption_tokenizer(CAPTIONS, PROMPTS, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_cfg(tokenizer: PreTrainedTokenizerFast) -> MiDashengLMConfig:
    return tiny_config(vocab_size=len(tokenizer), audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))


def random_tiny_model(cfg: MiDashengLMConfig, seed: int = 0) -> MiDashengLM:
    """A randomly initialised tiny model with non-trivial init_bn statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu").eval()
    # Non-trivial BatchNorm statistics so that init_bn actually does something.
    bn = model.audio_encoder.init_bn
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-60.0, -20.0, bn.num_features))
        bn.running_var.copy_(torch.linspace(50.0, 400.0, bn.num_features))
        bn.weight.copy_(torch.linspace(0.5, 1.5, bn.num_features))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, bn.num_features))
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg: MiDashengLMConfig) -> MiDashengLM:
    """Random tiny model; shared, so tests must not modify it (use ``fresh_model`` for that)."""
    return random_tiny_model(tiny_cfg)


@pytest.fixture
def fresh_model(tiny_model: MiDashengLM) -> MiDashengLM:
    return copy.deepcopy(tiny_model)


@pytest.fixture(scope="session")
def processor(tokenizer: PreTrainedTokenizerFast, tiny_cfg: MiDashengLMConfig) -> MiDashengProcessor:
    return MiDashengProcessor(tokenizer, tiny_cfg)


@pytest.fixture(scope="session")
def tiny_ckpt(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: MiDashengLM, tokenizer: PreTrainedTokenizerFast
) -> Path:
    """An unsharded checkpoint directory of ``tiny_model`` (read-only for tests: copy before editing)."""
    return save_model(tiny_model, tmp_path_factory.mktemp("tiny_ckpt"), tokenizer)


# --- the Qwen3 family (MiDashengLM-0.6B's decoder) --------------------------------------------


@pytest.fixture(scope="session")
def tiny_qwen3_cfg(tokenizer: PreTrainedTokenizerFast) -> MiDashengLMConfig:
    return tiny_qwen3_config(
        vocab_size=len(tokenizer), audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    )


@pytest.fixture(scope="session")
def tiny_qwen3_model(tiny_qwen3_cfg: MiDashengLMConfig) -> MiDashengLM:
    """Random tiny Qwen3-decoder model (tied lm_head); shared, so tests must not modify it.

    With transformers' init (std 0.02) and tied embeddings a random tiny decoder emits one token
    whatever the input, which would make cache/padding comparisons vacuous; PyTorch's default
    Linear init lets the layers, and so the audio, decide what comes out."""
    model = random_tiny_model(tiny_qwen3_cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.decoder.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    return model


@pytest.fixture(scope="session")
def qwen3_processor(
    tokenizer: PreTrainedTokenizerFast, tiny_qwen3_cfg: MiDashengLMConfig
) -> MiDashengProcessor:
    return MiDashengProcessor(tokenizer, tiny_qwen3_cfg)


@pytest.fixture(scope="session")
def tiny_qwen3_ckpt(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_qwen3_model: MiDashengLM,
    tokenizer: PreTrainedTokenizerFast,
) -> Path:
    """An unsharded checkpoint directory of ``tiny_qwen3_model`` (read-only: copy before editing)."""
    return save_model(tiny_qwen3_model, tmp_path_factory.mktemp("tiny_qwen3_ckpt"), tokenizer)
