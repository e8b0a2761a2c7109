"""Checkpoint I/O in the published MiDashengLM layout.

A model directory holds ``config.json``, ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, and the tokenizer
files (``tokenizer.json``, ``tokenizer_config.json``, ...). Loading builds the model on the meta
device and assigns the tensors read from the files, so the weights exist once in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.errors import CheckpointError
from services.model.config import MiDashengLMConfig
from services.model.modeling import EMBED_KEY, LM_HEAD_KEY, MiDashengLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Older files carry the frontend's window and filterbank; they are recomputed in fp32.
IGNORED_PREFIXES = ("audio_encoder.front_end.",)
IGNORED_SUFFIXES = (".num_batches_tracked",)
FP32_PREFIXES = ("audio_encoder.init_bn.",)  # stays fp32 whatever the model dtype
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError as e:
        raise CheckpointError(f"Unknown dtype {name!r}; use one of {sorted(DTYPES)}.") from e


def resolve_model_dir(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A local directory, ``demo`` / None for the bundled demo model, or a hub id when online."""
    if name_or_path is None or str(name_or_path) == "demo":
        path = DEMO_MODEL_DIR
        if not (path / CONFIG_NAME).exists():
            raise CheckpointError(f"The bundled demo model is missing from {path}; reinstall the package.")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{path} is a file; --model takes a checkpoint directory.")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise CheckpointError(
                f"{text!r} is not a local directory; install huggingface_hub to fetch hub ids."
            ) from e
        try:
            return Path(snapshot_download(text))
        except Exception as e:  # network, auth or missing repo: one clear sentence
            raise CheckpointError(f"Could not fetch {text!r} from the hub ({type(e).__name__}: {e}).") from e
    raise CheckpointError(f"Model directory {path} does not exist.")


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return [model_dir / f for f in files]
    single = model_dir / WEIGHTS_NAME
    if single.exists():
        return [single]
    raise CheckpointError(f"No {WEIGHTS_NAME} or {INDEX_NAME} in {model_dir}.")


def _ignored(key: str) -> bool:
    return key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def build_model(config: MiDashengLMConfig, device: str | torch.device = "meta") -> MiDashengLM:
    """The model with uninitialised (meta) or randomly initialised weights."""
    with torch.device(device):
        return MiDashengLM(config)


def random_model(
    config: MiDashengLMConfig, device: str | torch.device, dtype: torch.dtype = torch.float32
) -> MiDashengLM:
    """The model with small random weights made directly on ``device`` (no CPU copy of a 7B):
    for benchmarks of speed and memory, where the weights' values do not matter."""
    model = build_model(config, "meta").to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        bn = model.audio_encoder.init_bn
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        rotary = model.decoder.model.rotary_emb  # its buffers are not parameters: made again
        with torch.device(device):
            model.decoder.model.rotary_emb = type(rotary)(config=model.decoder.config)
    return model.to(dtype).eval()


def checkpoint_state(model: MiDashengLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict without tied aliases (a tied ``lm_head``)."""
    tied = model.tied_keys()
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def _summarise(kind: str, items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{len(items)} {kind}: {shown}"


def check_keys(expected: dict[str, torch.Size], found: dict[str, tuple[int, ...]], where: Path) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped key."""
    missing = sorted(k for k in expected if k not in found and not _ignored(k))
    unexpected = sorted(k for k in found if k not in expected and not _ignored(k))
    misshaped = sorted(
        f"{k} (checkpoint {list(found[k])}, model {list(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    )
    problems = [
        _summarise(kind, items)
        for kind, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", misshaped),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"Checkpoint {where} does not fit the model config: " + "; ".join(problems))


AUDIO_PREFIXES = ("audio_encoder.", "audio_projector.")


def load_model(
    model_dir: str | os.PathLike[str] | None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    audio_only: bool = False,
) -> MiDashengLM:
    """Load a checkpoint directory; the frontend and ``init_bn`` stay fp32.

    ``audio_only`` loads just the encoder and projector (what the encoder service needs); the
    decoder stays on the meta device and takes no memory.
    """
    path = resolve_model_dir(model_dir)
    dtype = parse_dtype(dtype)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"No {CONFIG_NAME} in {path}: not a checkpoint directory.")
    config = MiDashengLMConfig.from_file(path / CONFIG_NAME)
    model = build_model(config, "meta")
    tied = model.tied_keys()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if audio_only:
        expected = {k: v for k, v in expected.items() if k.startswith(AUDIO_PREFIXES)}

    files = weight_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if not audio_only or key.startswith(AUDIO_PREFIXES):
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
    # A tied alias is not stored; a file that holds it anyway must hold a copy (checked below).
    expected = {k: v for k, v in expected.items() if k not in tied or k in shapes}
    check_keys(expected, shapes, path)

    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for key in sf.keys():
                if _ignored(key) or key not in expected:
                    continue
                t = sf.get_tensor(key)
                if t.is_floating_point():
                    t = t.to(torch.float32 if key.startswith(FP32_PREFIXES) else dtype)
                state[key] = t
    for key, shape in expected.items():
        if key.endswith(IGNORED_SUFFIXES):
            state.setdefault(key, torch.zeros(shape, dtype=torch.long, device=device))
    if audio_only:
        model.audio_encoder.load_state_dict(_strip(state, "audio_encoder."), strict=True, assign=True)
        model.audio_projector.load_state_dict(_strip(state, "audio_projector."), strict=True, assign=True)
        _check_materialised(model.audio_encoder, model.audio_projector)
        return model.eval()
    stored_aliases = {k: state.pop(k) for k in tied if k in state}
    result = model.load_state_dict(state, strict=False, assign=True)
    if sorted(result.missing_keys) != sorted(tied) or result.unexpected_keys:
        raise CheckpointError(  # check_keys already named the file's problems; this is a bug guard
            f"Loading {path} left {result.missing_keys} unset and {result.unexpected_keys} unused."
        )
    if tied:
        _tie(model, stored_aliases, path)
    _materialise_buffers(model, device)
    return model.eval()


def _tie(model: MiDashengLM, stored_aliases: dict[str, torch.Tensor], path: Path) -> None:
    """Point the tied ``lm_head`` at the loaded embedding; a stored copy must equal it."""
    model.decoder.tie_weights()
    embed = model.get_parameter(EMBED_KEY)
    if model.get_parameter(LM_HEAD_KEY) is not embed:
        raise CheckpointError(f"Could not tie {LM_HEAD_KEY} to {EMBED_KEY} after loading {path}.")
    for key, t in stored_aliases.items():
        if not torch.equal(t, embed.data):
            raise CheckpointError(
                f"Checkpoint {path} holds {key}, which differs from {model.tied_keys()[key]}, but its "
                "config ties them (text_config.tie_word_embeddings); fix the config or the weights."
            )


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _check_materialised(*modules: torch.nn.Module) -> None:
    leftovers = [n for m in modules for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"Tensors left uninitialised after loading: {leftovers[:8]}")


def _materialise_buffers(model: MiDashengLM, device: str | torch.device) -> None:
    """Recreate non-persistent buffers (rotary frequencies) that were built on the meta device."""
    rotary = model.decoder.model.rotary_emb
    with torch.device(device):
        model.decoder.model.rotary_emb = type(rotary)(config=model.decoder.config)
    _check_materialised(model)


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def save_model(
    model: MiDashengLM,
    out_dir: str | os.PathLike[str],
    tokenizer=None,
    max_shard_bytes: int | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write config, safetensors (sharded past ``max_shard_bytes``) and the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = parse_dtype(dtype) if dtype is not None else None
    state: dict[str, torch.Tensor] = {}
    for key, t in checkpoint_state(model).items():  # a tied lm_head is written once, as the embedding
        t = t.detach()
        if target is not None and t.is_floating_point() and not key.startswith(FP32_PREFIXES):
            t = t.to(target)
        state[key] = t.to("cpu").contiguous().clone()
    model.config.save(out / CONFIG_NAME)
    shards = _shards(state, max_shard_bytes)
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_tokenizer(model_dir: str | os.PathLike[str] | None):
    """The checkpoint's fast tokenizer (``tokenizer.json``; the real model's Qwen2 files included)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_dir(model_dir)
    if (path / "tokenizer.json").exists():
        # Loaded directly: AutoTokenizer would consult config.json, whose model_type
        # ("midashenglm") transformers does not know.
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    if not any((path / n).exists() for n in ("vocab.json", "tokenizer_config.json")):
        raise CheckpointError(f"No tokenizer files (tokenizer.json, tokenizer_config.json) in {path}.")
    return AutoTokenizer.from_pretrained(str(path))
