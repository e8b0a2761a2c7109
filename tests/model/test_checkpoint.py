"""Checkpoint compatibility: published key layout, sharded I/O, strict key checks, dtypes, configs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from services.errors import CheckpointError, ConfigError
from services.model.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    build_model,
    checkpoint_state,
    load_model,
    save_model,
)
from services.model.config import MiDashengLMConfig, real_0_6b_config, real_7b_config
from services.model.generation import GenerationOptions, generate
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor, build_prompt
from tests.model.utils import batch_audio, make_wave

# --- the published layouts ---------------------------------------------------------------------


def published_audio_shapes(h: int) -> dict[str, tuple[int, ...]]:
    """Dasheng 0.6B encoder + projector keys (the same in every MiDashengLM), projecting to ``h``."""
    d, depth, mels = 1280, 32, 64
    s: dict[str, tuple[int, ...]] = {}
    for n in ("weight", "bias", "running_mean", "running_var"):
        s[f"audio_encoder.init_bn.{n}"] = (mels,)
    s["audio_encoder.init_bn.num_batches_tracked"] = ()
    s["audio_encoder.patch_embed.proj.weight"] = (d, 1, 64, 4)
    s["audio_encoder.patch_embed.proj.bias"] = (d,)
    s["audio_encoder.time_pos_embed"] = (1, d, 1, 252)
    s["audio_encoder.freq_pos_embed"] = (1, d, 1, 1)
    for i in range(depth):
        b = f"audio_encoder.blocks.{i}."
        for norm in ("norm1", "norm2"):
            s[b + norm + ".weight"] = (d,)
            s[b + norm + ".bias"] = (d,)
        s[b + "attn.qkv.weight"] = (3 * d, d)
        s[b + "attn.qkv.bias"] = (3 * d,)
        s[b + "attn.proj.weight"] = (d, d)
        s[b + "attn.proj.bias"] = (d,)
        s[b + "mlp.fc1.weight"] = (4 * d, d)
        s[b + "mlp.fc1.bias"] = (4 * d,)
        s[b + "mlp.fc2.weight"] = (d, 4 * d)
        s[b + "mlp.fc2.bias"] = (d,)
    s["audio_encoder.norm.weight"] = (d,)
    s["audio_encoder.norm.bias"] = (d,)
    s["audio_projector.net.0.weight"] = (h, 5 * d)
    s["audio_projector.net.0.bias"] = (h,)
    s["audio_projector.net.2.weight"] = (h, h)
    s["audio_projector.net.2.bias"] = (h,)
    return s


def published_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of mispeech/midashenglm-7b, generated from MODEL_REFERENCE.md's patterns."""
    h, layers, vocab, inter, kv = 3584, 28, 152064, 18944, 4 * 128
    s = published_audio_shapes(h)
    s["decoder.model.embed_tokens.weight"] = (vocab, h)
    for i in range(layers):
        b = f"decoder.model.layers.{i}."
        s[b + "self_attn.q_proj.weight"] = (h, h)
        s[b + "self_attn.q_proj.bias"] = (h,)
        for p in ("k_proj", "v_proj"):
            s[b + f"self_attn.{p}.weight"] = (kv, h)
            s[b + f"self_attn.{p}.bias"] = (kv,)
        s[b + "self_attn.o_proj.weight"] = (h, h)
        s[b + "mlp.gate_proj.weight"] = (inter, h)
        s[b + "mlp.up_proj.weight"] = (inter, h)
        s[b + "mlp.down_proj.weight"] = (h, inter)
        s[b + "input_layernorm.weight"] = (h,)
        s[b + "post_attention_layernorm.weight"] = (h,)
    s["decoder.model.norm.weight"] = (h,)
    s["decoder.lm_head.weight"] = (vocab, h)
    return s


def published_0_6b_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of mispeech/midashenglm-0.6b-fp32 from the published Qwen3-0.6B text config:
    16 query / 8 KV heads of head_dim 128 (q_proj is 2048 wide in a 1024 model), q/k RMSNorm
    over head_dim, no attention biases, and no ``decoder.lm_head.weight`` (tied embeddings)."""
    h, layers, vocab, inter, hd = 1024, 28, 151936, 3072, 128
    q, kv = 16 * hd, 8 * hd
    s = published_audio_shapes(h)
    s["decoder.model.embed_tokens.weight"] = (vocab, h)
    for i in range(layers):
        b = f"decoder.model.layers.{i}."
        s[b + "self_attn.q_proj.weight"] = (q, h)
        s[b + "self_attn.k_proj.weight"] = (kv, h)
        s[b + "self_attn.v_proj.weight"] = (kv, h)
        s[b + "self_attn.o_proj.weight"] = (h, q)
        s[b + "self_attn.q_norm.weight"] = (hd,)
        s[b + "self_attn.k_norm.weight"] = (hd,)
        s[b + "mlp.gate_proj.weight"] = (inter, h)
        s[b + "mlp.up_proj.weight"] = (inter, h)
        s[b + "mlp.down_proj.weight"] = (h, inter)
        s[b + "input_layernorm.weight"] = (h,)
        s[b + "post_attention_layernorm.weight"] = (h,)
    s["decoder.model.norm.weight"] = (h,)
    return s


def numel(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(prefix))


@pytest.fixture(scope="module")
def meta_7b() -> MiDashengLM:
    return build_model(real_7b_config(), "meta")


@pytest.fixture(scope="module")
def meta_0_6b() -> MiDashengLM:
    return build_model(real_0_6b_config(), "meta")


def test_real_7b_key_set_and_shapes(meta_7b: MiDashengLM) -> None:
    expected = published_7b_shapes()
    assert len(expected) == 738
    got = {k: tuple(v.shape) for k, v in meta_7b.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []  # nothing extra
    assert sorted(set(expected) - set(got)) == []  # nothing missing
    assert got == expected
    assert len(got) == 738
    assert meta_7b.tied_keys() == {}  # the checkpoint key set is the whole state dict
    assert {k: tuple(v.shape) for k, v in checkpoint_state(meta_7b).items()} == expected


def test_real_7b_parameter_counts(meta_7b: MiDashengLM) -> None:
    enc = sum(p.numel() for p in meta_7b.audio_encoder.parameters())
    dec = sum(p.numel() for p in meta_7b.decoder.parameters())
    proj = sum(p.numel() for p in meta_7b.audio_projector.parameters())
    assert round(enc / 1e5) / 10 == 630.3
    assert dec == 7_615_616_512 == numel(published_7b_shapes(), "decoder.")
    assert proj == 3584 * 6400 + 3584 + 3584 * 3584 + 3584


def test_real_0_6b_key_set_and_shapes(meta_0_6b: MiDashengLM) -> None:
    expected = published_0_6b_shapes()
    audio = {k: v for k, v in published_7b_shapes().items() if k.startswith("audio_encoder.")}
    assert {k: v for k, v in expected.items() if k.startswith("audio_encoder.")} == audio  # same encoder
    assert len(expected) == 395 + 4 + 1 + 28 * 11 + 1 == 709
    got = {k: tuple(v.shape) for k, v in checkpoint_state(meta_0_6b).items()}
    assert sorted(set(got) - set(expected)) == []  # nothing extra
    assert sorted(set(expected) - set(got)) == []  # nothing missing
    assert got == expected
    assert "decoder.lm_head.weight" not in got
    assert not any(k.endswith(".bias") for k in got if k.startswith("decoder."))
    # The module still has an lm_head: the embedding matrix under a second name.
    assert meta_0_6b.tied_keys() == {"decoder.lm_head.weight": "decoder.model.embed_tokens.weight"}
    assert set(meta_0_6b.state_dict()) == set(expected) | {"decoder.lm_head.weight"}
    assert meta_0_6b.decoder.lm_head.weight is meta_0_6b.decoder.model.embed_tokens.weight


def test_real_0_6b_parameter_counts(meta_0_6b: MiDashengLM) -> None:
    shapes = published_0_6b_shapes()
    # Qwen3-0.6B, tied: 151936*1024 embedding + 28 layers of 15,730,944 + the final norm.
    per_layer = (2048 + 1024 + 1024) * 1024 + 1024 * 2048 + 2 * 128 + 3 * 1024 * 3072 + 2 * 1024
    assert per_layer == 15_730_944
    assert numel(shapes, "decoder.") == 151936 * 1024 + 28 * per_layer + 1024 == 596_049_920
    dec = sum(p.numel() for p in meta_0_6b.decoder.parameters())  # the tied lm_head counts once
    print(f"MiDashengLM-0.6B decoder parameters: {dec:,}")
    assert dec == 596_049_920
    enc = sum(p.numel() for p in meta_0_6b.audio_encoder.parameters())
    assert enc == numel(shapes, "audio_encoder.") - (64 + 64 + 1)  # init_bn running stats are buffers
    assert round(enc / 1e5) / 10 == 630.3
    proj = sum(p.numel() for p in meta_0_6b.audio_projector.parameters())
    assert proj == 1024 * 6400 + 1024 + 1024 * 1024 + 1024 == numel(shapes, "audio_projector.") == 7_604_224


def test_real_0_6b_decoder_is_qwen3(meta_0_6b: MiDashengLM) -> None:
    cfg = real_0_6b_config()
    assert cfg.decoder_family == "qwen3" and cfg.tie_word_embeddings
    assert type(meta_0_6b.decoder) is Qwen3ForCausalLM
    dc = meta_0_6b.decoder.config
    assert isinstance(dc, Qwen3Config)
    assert (dc.hidden_size, dc.num_attention_heads, dc.num_key_value_heads, dc.head_dim) == (1024, 16, 8, 128)
    assert dc.tie_word_embeddings is True and dc.attention_bias is False
    assert dict(dc.rope_parameters or {}).get("rope_theta") == 1_000_000
    assert (dc.rms_norm_eps, dc.max_position_embeddings, dc.vocab_size) == (1e-6, 40960, 151936)
    assert (dc.bos_token_id, dc.eos_token_id) == (151643, 151645)
    assert cfg.audio_encoder_config == real_7b_config().audio_encoder_config
    assert (cfg.subsample_factor, cfg.audio_token_id) == (5, 151646)


@pytest.mark.parametrize("make", [real_7b_config, real_0_6b_config])
def test_real_model_on_meta_allocates_nothing(make) -> None:
    model = build_model(make(), "meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    # The frontend constants are real fp32 CPU tensors even on meta (recomputed, never loaded).
    fe = model.audio_encoder.front_end
    assert fe._fb.device.type == "cpu" and fe._fb.dtype == torch.float32 and fe._fb.shape == (257, 64)
    assert fe._window.device.type == "cpu" and fe._window.shape == (512,)


@pytest.mark.parametrize("make", [real_7b_config, real_0_6b_config])
def test_real_config_round_trips_through_json(make) -> None:
    cfg = make()
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["model_type"] == "midashenglm"
    assert data["architectures"] == ["MiDashengLMModel"]
    assert data["audio_encoder_config"]["model_type"] == "midashenglm_dasheng_encoder"
    assert data["audio_encoder_config"]["patch_size"] == [64, 4]
    again = MiDashengLMConfig.from_dict(data)
    assert again.to_dict() == cfg.to_dict()
    assert again.audio_encoder_config == cfg.audio_encoder_config
    assert again.decoder_config().to_dict() == cfg.decoder_config().to_dict()


# --- helpers for tiny checkpoints -------------------------------------------------------------


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_same_weights(a: MiDashengLM, b: MiDashengLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [make_wave(2.3, seed=1), make_wave(4.0, seed=2)]


def assert_same_behaviour(
    a: MiDashengLM, b: MiDashengLM, processor: MiDashengProcessor, clips: list[np.ndarray]
) -> None:
    audio, lengths = batch_audio(clips)
    with torch.inference_mode():
        ea, ma = a.encode_audio(audio, lengths)
        eb, mb = b.encode_audio(audio, lengths)
    assert torch.equal(ea, eb) and torch.equal(ma, mb)
    inp = processor([build_prompt()] * len(clips), clips)
    opts = GenerationOptions(max_new_tokens=8)
    ta, tb = generate(a, inp, [], opts), generate(b, inp, [], opts)
    assert ta == tb and all(len(t) == 8 for t in ta)


# --- round trips ------------------------------------------------------------------------------


def test_sharded_round_trip_is_bit_exact(
    tmp_path: Path,
    tiny_model: MiDashengLM,
    tokenizer: PreTrainedTokenizerFast,
    processor: MiDashengProcessor,
    clips: list[np.ndarray],
) -> None:
    out = save_model(tiny_model, tmp_path / "sharded", tokenizer, max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert not (out / WEIGHTS_NAME).exists()
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / INDEX_NAME).read_text())
    state = tiny_model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:  # each key lives in the shard the index names
        for key in load_file(str(shard)):
            assert index["weight_map"][key] == shard.name
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()

    loaded = load_model(out)
    assert not loaded.training
    assert_same_weights(tiny_model, loaded)
    assert_same_behaviour(tiny_model, loaded, processor, clips)


def test_unsharded_round_trip_is_bit_exact(
    tiny_ckpt: Path, tiny_model: MiDashengLM, processor: MiDashengProcessor, clips: list[np.ndarray]
) -> None:
    assert (tiny_ckpt / WEIGHTS_NAME).exists()
    assert not (tiny_ckpt / INDEX_NAME).exists()
    assert list(tiny_ckpt.glob("model-*.safetensors")) == []
    assert set(load_file(str(tiny_ckpt / WEIGHTS_NAME))) == set(tiny_model.state_dict())
    loaded = load_model(tiny_ckpt)
    assert_same_weights(tiny_model, loaded)
    assert_same_behaviour(tiny_model, loaded, processor, clips)


def test_real_layout_with_frontend_buffers_and_without_num_batches_tracked(
    tmp_path: Path, tiny_ckpt: Path, tiny_model: MiDashengLM
) -> None:
    """Older published files carry the frontend window/filterbank and no num_batches_tracked."""
    state = load_file(str(tiny_ckpt / WEIGHTS_NAME))
    del state["audio_encoder.init_bn.num_batches_tracked"]
    # Deliberately wrong values: they must be ignored, the frontend recomputes its constants.
    state["audio_encoder.front_end.0.spectrogram.window"] = torch.full((512,), 7.0)
    state["audio_encoder.front_end.0.mel_scale.fb"] = torch.full((257, 64), 3.0)
    keys = sorted(state)
    half = len(keys) // 2
    out = tmp_path / "real_layout"
    out.mkdir()
    shutil.copy(tiny_ckpt / "config.json", out / "config.json")
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [keys[:half], keys[half:]]
    weight_map = {}
    for name, part in zip(names, parts, strict=True):
        save_file({k: state[k].contiguous() for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    loaded = load_model(out)
    ref = tiny_model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], ref[k]), k
    fe_ref, fe = tiny_model.audio_encoder.front_end, loaded.audio_encoder.front_end
    assert torch.equal(fe._fb, fe_ref._fb) and torch.equal(fe._window, fe_ref._window)
    audio, lengths = batch_audio([make_wave(1.5, seed=3)])
    with torch.inference_mode():
        assert torch.equal(loaded.encode_audio(audio, lengths)[0], tiny_model.encode_audio(audio, lengths)[0])


# --- strict key checks ------------------------------------------------------------------------


def _edit_weights(path: Path, edit) -> None:
    state = load_file(str(path / WEIGHTS_NAME))
    edit(state)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(path / WEIGHTS_NAME), metadata={"format": "pt"}
    )


def test_missing_key_is_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    key = "audio_encoder.blocks.1.mlp.fc2.bias"
    _edit_weights(d, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys: .*audio_encoder\.blocks\.1\.mlp\.fc2\.bias"):
        load_model(d)


def test_extra_key_is_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    key = "audio_encoder.blocks.9.attn.qkv.weight"
    _edit_weights(d, lambda s: s.__setitem__(key, torch.zeros(192, 64)))
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: .*audio_encoder\.blocks\.9\.attn\.qkv\.weight"
    ):
        load_model(d)


def test_misshaped_key_is_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    key = "audio_projector.net.2.bias"
    _edit_weights(d, lambda s: s.__setitem__(key, torch.zeros(65)))
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped keys: .*audio_projector\.net\.2\.bias \(checkpoint \[65\], model \[64\]\)",
    ):
        load_model(d)


def test_missing_weights_file(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"No model\.safetensors or model\.safetensors\.index\.json"):
        load_model(d)


def test_index_naming_a_missing_shard(tmp_path: Path, tiny_model: MiDashengLM) -> None:
    out = save_model(tiny_model, tmp_path / "s", max_shard_bytes=100_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(out)


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config_json_message_names_the_file(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises((CheckpointError, ConfigError), match=r"config\.json"):
        load_model(d)


def test_missing_config_json_is_a_checkpoint_error(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(d)


# --- dtypes -----------------------------------------------------------------------------------


def test_load_bfloat16_keeps_frontend_and_init_bn_fp32(tiny_ckpt: Path, tiny_model: MiDashengLM) -> None:
    model = load_model(tiny_ckpt, dtype="bfloat16")
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert t.dtype == torch.long
        elif name.startswith("audio_encoder.init_bn."):
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    assert model.decoder.lm_head.weight.dtype == torch.bfloat16
    assert model.audio_encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    fe = model.audio_encoder.front_end
    assert fe._fb.dtype == torch.float32 and fe._window.dtype == torch.float32
    # init_bn loaded in full precision: its statistics equal the fp32 ones exactly.
    assert torch.equal(model.audio_encoder.init_bn.running_var, tiny_model.audio_encoder.init_bn.running_var)

    audio, lengths = batch_audio([make_wave(3.0, seed=4), make_wave(1.0, seed=5)])
    with torch.inference_mode():
        emb, mask = model.encode_audio(audio, lengths)
        ref, _ = tiny_model.encode_audio(audio, lengths)
    assert emb.dtype == torch.bfloat16
    assert torch.isfinite(emb.float()).all()
    valid = mask[..., None].expand_as(ref)
    rel = (emb.float() - ref)[valid].norm() / ref[valid].norm()
    assert rel < 0.1


def test_model_to_bfloat16_keeps_init_bn_fp32(fresh_model: MiDashengLM) -> None:
    model = fresh_model.to(torch.bfloat16)
    bn = model.audio_encoder.init_bn
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert t.dtype == torch.float32
    assert model.audio_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert model.decoder.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.audio_encoder.front_end._fb.dtype == torch.float32
    audio, lengths = batch_audio([make_wave(1.2, seed=6)])
    with torch.inference_mode():
        emb, _ = model.encode_audio(audio, lengths)
    assert emb.dtype == torch.bfloat16 and torch.isfinite(emb.float()).all()


# --- text config variants ---------------------------------------------------------------------


def _rewrite_text_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_qwen2_5_omni_text_model_type_loads_identically(
    tmp_path: Path, tiny_ckpt: Path, processor: MiDashengProcessor, clips: list[np.ndarray]
) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "omni")
    # head_dim 16 -> 8 rotary frequencies split over the three M-RoPE axes.
    _rewrite_text_config(
        d,
        model_type="qwen2_5_omni_text",
        rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
    )
    omni = load_model(d)
    assert omni.config.text_config["model_type"] == "qwen2_5_omni_text"
    plain = load_model(tiny_ckpt)
    assert plain.config.text_config["model_type"] == "qwen2"
    assert_same_weights(plain, omni)
    inp = processor([build_prompt()] * len(clips), clips)
    with torch.inference_mode():
        la = plain(
            inp.input_ids, inp.attention_mask, inp.audio, inp.audio_lengths, inp.audio_token_counts
        ).logits
        lb = omni(
            inp.input_ids, inp.attention_mask, inp.audio, inp.audio_lengths, inp.audio_token_counts
        ).logits
    assert torch.equal(la, lb)
    assert_same_behaviour(plain, omni, processor, clips)


def test_unknown_text_model_type_is_a_config_error(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = copy_ckpt(tiny_ckpt, tmp_path / "llama")
    _rewrite_text_config(d, model_type="llama")
    with pytest.raises(ConfigError, match="llama"):
        load_model(d)
    data = real_7b_config().to_dict()
    data["text_config"]["model_type"] = "mistral"
    with pytest.raises(ConfigError, match="mistral"):
        MiDashengLMConfig.from_dict(data)


def test_audio_only_load_skips_the_decoder(tiny_ckpt: Path) -> None:
    full = load_model(tiny_ckpt)
    audio = load_model(tiny_ckpt, audio_only=True)
    assert audio.decoder.model.embed_tokens.weight.is_meta  # no memory for the decoder
    assert not any(p.is_meta for p in audio.audio_encoder.parameters())
    x = torch.randn(2, 40000) * 0.1
    lengths = torch.tensor([40000, 25000])
    a, ma = audio.encode_audio(x, lengths)
    b, mb = full.encode_audio(x, lengths)
    assert torch.equal(a, b) and torch.equal(ma, mb)


# --- the Qwen3 family: tied embeddings ----------------------------------------------------------


def assert_tied(model: MiDashengLM) -> None:
    assert model.decoder.lm_head.weight is model.decoder.model.embed_tokens.weight
    assert not model.decoder.lm_head.weight.is_meta


def test_tiny_qwen3_model_is_a_qwen3_decoder(tiny_qwen3_model: MiDashengLM) -> None:
    assert type(tiny_qwen3_model.decoder) is Qwen3ForCausalLM
    assert_tied(tiny_qwen3_model)
    attn = tiny_qwen3_model.decoder.model.layers[0].self_attn
    # head_dim comes from the config (32), not hidden/heads (64 / 4 = 16).
    assert attn.head_dim == 32 and attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (32,)
    assert attn.q_proj.weight.shape == (4 * 32, 64) and attn.k_proj.weight.shape == (2 * 32, 64)
    assert attn.q_proj.bias is None and attn.o_proj.bias is None


def test_qwen3_unsharded_round_trip_is_bit_exact(
    tiny_qwen3_ckpt: Path,
    tiny_qwen3_model: MiDashengLM,
    qwen3_processor: MiDashengProcessor,
    clips: list[np.ndarray],
) -> None:
    stored = load_file(str(tiny_qwen3_ckpt / WEIGHTS_NAME))
    assert "decoder.lm_head.weight" not in stored  # written once, as the embedding
    assert set(stored) == set(checkpoint_state(tiny_qwen3_model))
    assert set(stored) | {"decoder.lm_head.weight"} == set(tiny_qwen3_model.state_dict())
    assert "decoder.model.layers.1.self_attn.k_norm.weight" in stored
    loaded = load_model(tiny_qwen3_ckpt)
    assert type(loaded.decoder) is Qwen3ForCausalLM
    assert_tied(loaded)
    assert_same_weights(tiny_qwen3_model, loaded)
    assert_same_behaviour(tiny_qwen3_model, loaded, qwen3_processor, clips)


def test_qwen3_sharded_round_trip_is_bit_exact(
    tmp_path: Path,
    tiny_qwen3_model: MiDashengLM,
    tokenizer: PreTrainedTokenizerFast,
    qwen3_processor: MiDashengProcessor,
    clips: list[np.ndarray],
) -> None:
    out = save_model(tiny_qwen3_model, tmp_path / "sharded", tokenizer, max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / WEIGHTS_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    state = checkpoint_state(tiny_qwen3_model)
    assert "decoder.lm_head.weight" not in index["weight_map"]
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    on_disk = {k for shard in shards for k in load_file(str(shard))}
    assert on_disk == set(state)
    loaded = load_model(out)
    assert_tied(loaded)
    assert_same_weights(tiny_qwen3_model, loaded)
    assert_same_behaviour(tiny_qwen3_model, loaded, qwen3_processor, clips)


@pytest.mark.parametrize(
    "key",
    [
        "decoder.model.layers.1.self_attn.k_norm.weight",
        "decoder.model.layers.0.self_attn.q_proj.weight",
        "decoder.model.embed_tokens.weight",  # the tied lm_head does not stand in for it
    ],
)
def test_qwen3_missing_key_is_named(tmp_path: Path, tiny_qwen3_ckpt: Path, key: str) -> None:
    d = copy_ckpt(tiny_qwen3_ckpt, tmp_path / "c")
    _edit_weights(d, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"1 missing keys: " + key.replace(".", r"\.") + "$"):
        load_model(d)


def test_qwen3_misshaped_norm_is_named(tmp_path: Path, tiny_qwen3_ckpt: Path) -> None:
    """A q_norm over hidden/heads (16) instead of head_dim (32) is refused, naming both shapes."""
    d = copy_ckpt(tiny_qwen3_ckpt, tmp_path / "c")
    key = "decoder.model.layers.0.self_attn.q_norm.weight"
    _edit_weights(d, lambda s: s.__setitem__(key, torch.ones(16)))
    with pytest.raises(
        CheckpointError, match=key.replace(".", r"\.") + r" \(checkpoint \[16\], model \[32\]\)"
    ):
        load_model(d)


def test_qwen3_stored_lm_head_must_equal_the_embedding(
    tmp_path: Path, tiny_qwen3_ckpt: Path, tiny_qwen3_model: MiDashengLM
) -> None:
    """Some exporters write the tied lm_head anyway: a copy loads (still tied), anything else is refused."""
    same = copy_ckpt(tiny_qwen3_ckpt, tmp_path / "same")
    _edit_weights(
        same,
        lambda s: s.__setitem__("decoder.lm_head.weight", s["decoder.model.embed_tokens.weight"].clone()),
    )
    loaded = load_model(same)
    assert_tied(loaded)
    assert_same_weights(tiny_qwen3_model, loaded)

    other = copy_ckpt(tiny_qwen3_ckpt, tmp_path / "other")
    _edit_weights(
        other,
        lambda s: s.__setitem__("decoder.lm_head.weight", s["decoder.model.embed_tokens.weight"] + 1e-3),
    )
    with pytest.raises(CheckpointError, match=r"decoder\.lm_head\.weight.*differs.*tie_word_embeddings"):
        load_model(other)

    misshaped = copy_ckpt(tiny_qwen3_ckpt, tmp_path / "misshaped")
    _edit_weights(misshaped, lambda s: s.__setitem__("decoder.lm_head.weight", torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: decoder\.lm_head\.weight"):
        load_model(misshaped)


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Only a config that ties the embeddings may leave lm_head out (the 7B's is untied)."""
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    _edit_weights(d, lambda s: s.pop("decoder.lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: decoder\.lm_head\.weight$"):
        load_model(d)


def test_qwen3_load_bfloat16_stays_tied(
    tmp_path: Path, tiny_qwen3_ckpt: Path, tiny_qwen3_model: MiDashengLM
) -> None:
    model = load_model(tiny_qwen3_ckpt, dtype="bfloat16")
    assert_tied(model)
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert t.dtype == torch.long
        elif name.startswith("audio_encoder.init_bn."):
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    ref = tiny_qwen3_model.decoder.model.embed_tokens.weight
    assert torch.equal(model.decoder.lm_head.weight, ref.to(torch.bfloat16))
    fe = model.audio_encoder.front_end
    assert fe._fb.dtype == torch.float32 and fe._window.dtype == torch.float32
    # Saving in bf16 and loading back in fp32 writes the embedding once and keeps the tie.
    out = save_model(model, tmp_path / "bf16_copy", dtype="bfloat16")
    assert "decoder.lm_head.weight" not in load_file(str(out / WEIGHTS_NAME))
    again = load_model(out, dtype="bfloat16")
    assert_tied(again)
    assert_same_weights(model, again)


def test_qwen3_audio_only_load_skips_the_decoder(
    tiny_qwen3_ckpt: Path, tiny_qwen3_model: MiDashengLM
) -> None:
    audio = load_model(tiny_qwen3_ckpt, audio_only=True)
    assert audio.decoder.model.embed_tokens.weight.is_meta
    x = torch.randn(2, 40000) * 0.1
    lengths = torch.tensor([40000, 25000])
    a, ma = audio.encode_audio(x, lengths)
    b, mb = tiny_qwen3_model.encode_audio(x, lengths)
    assert torch.equal(a, b) and torch.equal(ma, mb)
