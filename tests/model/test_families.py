"""Both published decoder families through the whole model: Qwen2 (MiDashengLM-7B) and Qwen3
(MiDashengLM-0.6B: q/k RMSNorm, head_dim from the config, tied embeddings).

The decoder class follows ``text_config.model_type``; the processor, the teacher-forced forward,
generation and every caption engine work the same way for each family."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

from services.errors import ConfigError
from services.model.config import MiDashengLMConfig, tiny_config, tiny_qwen3_config
from services.model.generation import GenerationOptions, generate
from services.model.modeling import MiDashengLM
from services.model.processor import IGNORE_INDEX, MiDashengProcessor, build_prompt
from tests.model.utils import make_wave

FAMILIES = ("qwen2", "qwen3")
DECODER_CLASSES = {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}
ANSWERS = ["A steady low tone.", "Pink noise, then silence."]


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model(family: str, request: pytest.FixtureRequest) -> MiDashengLM:
    return request.getfixturevalue("tiny_model" if family == "qwen2" else "tiny_qwen3_model")


@pytest.fixture
def proc(family: str, request: pytest.FixtureRequest) -> MiDashengProcessor:
    return request.getfixturevalue("processor" if family == "qwen2" else "qwen3_processor")


@pytest.fixture
def ckpt(family: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_ckpt" if family == "qwen2" else "tiny_qwen3_ckpt")


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [make_wave(1.3, seed=7), make_wave(3.1, seed=8)]


def test_the_decoder_class_follows_text_config(family: str, model: MiDashengLM) -> None:
    assert model.config.decoder_family == family
    assert type(model.decoder) is DECODER_CLASSES[family]
    attn = model.decoder.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") == hasattr(attn, "k_norm") == (family == "qwen3")
    assert (attn.q_proj.bias is not None) == (family == "qwen2")  # Qwen2 has q/k/v biases
    tied = model.decoder.lm_head.weight is model.decoder.model.embed_tokens.weight
    assert tied == (family == "qwen3") == bool(model.tied_keys())


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_5_omni_text", "qwen2_5_omni_thinker_text", "qwen3"])
def test_decoder_family_of_each_accepted_model_type(model_type: str) -> None:
    data = tiny_config().to_dict()
    data["text_config"]["model_type"] = model_type
    cfg = MiDashengLMConfig.from_dict(data)
    assert cfg.decoder_family == ("qwen3" if model_type == "qwen3" else "qwen2")
    assert cfg.decoder_config().model_type == cfg.decoder_family


@pytest.mark.parametrize("model_type", ["qwen3_moe", "llama", "qwen2_moe"])
def test_other_decoders_are_a_config_error(model_type: str) -> None:
    data = tiny_qwen3_config().to_dict()
    data["text_config"]["model_type"] = model_type
    with pytest.raises(ConfigError, match=rf"text_config\.model_type '{model_type}' is not supported"):
        MiDashengLMConfig.from_dict(data)


def test_qwen3_head_dim_comes_from_the_config() -> None:
    cfg = tiny_qwen3_config(hidden_size=96, heads=4, kv_heads=2)
    dc = cfg.decoder_config()
    assert dc.head_dim == 48 != 96 // 4
    text = dict(cfg.text_config)
    del text["head_dim"]  # transformers' Qwen3 default, as for a published config without it
    again = MiDashengLMConfig(cfg.audio_encoder_config, cfg.subsample_factor, text, cfg.audio_token_id)
    assert again.decoder_config().head_dim == 128


def test_processor_and_forward(
    family: str, model: MiDashengLM, proc: MiDashengProcessor, clips: list[np.ndarray]
) -> None:
    """Teacher-forced forward with labels: logits, a finite loss, gradients to every part, and the
    last prompt position's argmax is generation's first token."""
    prompts = [build_prompt(), build_prompt("Describe it.")]
    inp = proc(prompts, clips, ANSWERS)
    assert inp.labels is not None
    trained = copy.deepcopy(model).train()
    out = trained(
        inp.input_ids, inp.attention_mask, inp.audio, inp.audio_lengths, inp.audio_token_counts, inp.labels
    )
    vocab = int(model.config.text_config["vocab_size"])
    assert out.logits.shape == (*inp.input_ids.shape, vocab)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss) and out.loss > 0
    # The loss is next-token cross-entropy over the answer tokens only.
    logits, labels = out.logits[:, :-1].float(), inp.labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(out.loss, ref, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    layer = trained.decoder.model.layers[0].self_attn
    grads = {
        "encoder": trained.audio_encoder.patch_embed.proj.weight.grad,
        "projector": trained.audio_projector.net[0].weight.grad,
        "embed": trained.decoder.model.embed_tokens.weight.grad,
        "q_proj": layer.q_proj.weight.grad,
    }
    if family == "qwen3":
        grads["q_norm"] = layer.q_norm.weight.grad
        grads["k_norm"] = layer.k_norm.weight.grad
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and bool(g.abs().sum() > 0), name

    plain = proc(prompts, clips)
    with torch.inference_mode():
        logits = model(
            plain.input_ids, plain.attention_mask, plain.audio, plain.audio_lengths, plain.audio_token_counts
        ).logits
    first = generate(model, plain, [], GenerationOptions(max_new_tokens=1))
    assert [[int(t)] for t in logits[:, -1].argmax(-1)] == first


def test_the_audio_changes_the_logits(model: MiDashengLM, proc: MiDashengProcessor) -> None:
    a = proc([build_prompt()], [make_wave(2.0, seed=1)])
    b = proc([build_prompt()], [make_wave(2.0, seed=2)])
    assert torch.equal(a.input_ids, b.input_ids)
    with torch.inference_mode():
        la = model(a.input_ids, a.attention_mask, a.audio, a.audio_lengths, a.audio_token_counts).logits
        lb = model(b.input_ids, b.attention_mask, b.audio, b.audio_lengths, b.audio_token_counts).logits
    assert not torch.allclose(la[:, -1], lb[:, -1])


def test_every_engine_serves_both_families(
    family: str, ckpt: Path, model: MiDashengLM, proc: MiDashengProcessor, clips: list[np.ndarray]
) -> None:
    """Each caption engine, over a checkpoint of either family loaded the serving way, gives the
    tokens that captioning each window alone with :func:`generate` gives."""
    from lm_service.engines import ENGINES, make_engine
    from lm_service.engines.base import CaptionRequest, caption_all
    from services.model.loading import load_pretrained

    loaded = load_pretrained(ckpt, "cpu")
    assert loaded.model.config.decoder_family == family
    assert type(loaded.model.decoder) is DECODER_CLASSES[family]
    options = GenerationOptions(max_new_tokens=10)
    prompts = ["Caption the audio.", "Describe it."]
    expected = [
        generate(model, proc([build_prompt(p)], [c]), proc.stop_ids(), options)[0]
        for p, c in zip(prompts, clips, strict=True)
    ]
    assert all(len(e) >= 3 for e in expected)  # a real comparison, not two empty captions
    windows = []  # each clip's audio tokens, encoded alone (as generate does above)
    with torch.inference_mode():
        for c in clips:
            tokens, mask = model.encode_audio(torch.from_numpy(c)[None], torch.tensor([len(c)]))
            windows.append(tokens[0][mask[0]])
    reqs = [CaptionRequest(w, p, options) for w, p in zip(windows, prompts, strict=True)]
    for kind in ENGINES:
        engine = make_engine(kind, loaded)
        try:
            encoded = engine.encode_audio([torch.from_numpy(c) for c in clips])
            got = caption_all(engine, reqs, 120.0)
        finally:
            engine.close()
        for w, e in zip(windows, encoded, strict=True):  # batched with padding: equal up to rounding
            assert e.shape == w.shape and torch.allclose(e, w, atol=1e-5), kind
        assert [list(r.token_ids) for r in got] == expected, kind
