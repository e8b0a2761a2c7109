"""Write a Triton model repository for a checkpoint's Dasheng encoder (``midasheng triton-repo``).

Layout (one model; run it again with another ``name`` to add more to the same repository)::

    REPO/<name>/config.pbtxt          inputs/outputs, max_batch_size, dynamic batching,
                                      instance groups, version policy, parameters
    REPO/<name>/<version>/model.py    encoder_service/backends/triton_model.py, verbatim
    REPO/<name>/<version>/config.json the checkpoint's config
    REPO/<name>/<version>/model.safetensors  the checkpoint's audio tensors, as stored

The repository loads in a stock ``tritonserver`` whose Python backend can import this project
(``project_root``) and torch, transformers and safetensors (``deploy/triton/README.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from encoder_service.backends import triton_model
from encoder_service.backends.base import EncoderGeometry
from services.errors import ConfigError
from services.model.checkpoint import (
    AUDIO_PREFIXES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    resolve_model_dir,
    weight_files,
)
from services.model.config import EncoderConfig, MiDashengLMConfig

DEFAULT_MODEL_NAME = "dasheng_encoder"
KINDS = ("cpu", "gpu")


def project_root() -> Path:
    """The directory that holds this project's ``services`` package (what the model imports)."""
    return Path(triton_model.__file__).resolve().parents[2]


def encoder_config_json(cfg: EncoderConfig) -> str:
    """The encoder config as written into ``config.pbtxt`` and compared by clients."""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


@dataclass(frozen=True)
class RepoOptions:
    """How Triton serves the encoder."""

    name: str = DEFAULT_MODEL_NAME
    version: int = 1
    kind: str = "cpu"  # instance kind: cpu or gpu
    instances: int = 1  # model instances per device
    gpus: tuple[int, ...] = ()  # GPU ids for kind=gpu (empty: every GPU)
    max_batch_size: int = 64  # windows per batch Triton may form
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a preferred size
    dtype: str = ""  # weights dtype in Triton; empty: float32 on CPU, bfloat16 on GPU
    project_root: str = ""  # empty: this project's directory

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"model name {self.name!r} is not a directory name")
        if self.kind not in KINDS:
            raise ConfigError(f"instance kind must be one of {KINDS}, got {self.kind!r}")
        if self.version < 1 or self.instances < 1 or self.max_batch_size < 1 or self.max_queue_delay_us < 0:
            raise ConfigError("version, instances and max_batch_size must be >= 1, max_queue_delay_us >= 0")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(
                f"preferred batch sizes {bad} are outside 1..max_batch_size ({self.max_batch_size})"
            )
        if self.dtype not in ("", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.gpus and self.kind != "gpu":
            raise ConfigError("gpus are only for kind=gpu")

    @property
    def weights_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.kind == "gpu" else "float32")


def _list(values: list[int] | tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a protobuf text-format string literal


def config_pbtxt(cfg: EncoderConfig, opts: RepoOptions, source: str, weights_sha256: str) -> str:
    g = EncoderGeometry.of(cfg)
    gpus = f"\n    gpus: {_list(opts.gpus)}" if opts.gpus else ""
    params = {
        triton_model.PROJECT_ROOT_PARAM: opts.project_root or str(project_root()),
        triton_model.DTYPE_PARAM: opts.weights_dtype,
        triton_model.ENCODER_CONFIG_PARAM: encoder_config_json(cfg),
        "checkpoint": source,
        "weights_sha256": weights_sha256,
    }
    param_text = "\n".join(
        f"parameters: {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
        for k, v in params.items()
    )
    return f"""# Written by `midasheng triton-repo` from {source}
# The Dasheng audio encoder of midasheng-live (Python backend; see docs/encoders.md).
name: {_quote(opts.name)}
backend: "python"
max_batch_size: {opts.max_batch_size}
input [
  {{
    name: "{triton_model.MEL}"
    data_type: TYPE_FP32
    dims: {_list([g.n_mels, g.window_frames])}
  }},
  {{
    name: "{triton_model.FRAMES}"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }},
  {{
    name: "{triton_model.VALID_PATCHES}"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }}
]
output [
  {{
    name: "{triton_model.FEATURES}"
    data_type: TYPE_FP32
    dims: {_list([g.window_patches, g.embed_dim])}
  }}
]
dynamic_batching {{
  preferred_batch_size: {_list(opts.preferred_batch_sizes)}
  max_queue_delay_microseconds: {opts.max_queue_delay_us}
}}
instance_group [
  {{
    count: {opts.instances}
    kind: KIND_{opts.kind.upper()}{gpus}
  }}
]
version_policy: {{ latest: {{ num_versions: 1 }} }}
{param_text}
"""


def _copy_audio_weights(src_dir: Path, dst: Path) -> str:
    """The checkpoint's audio tensors (as stored) into one safetensors file; returns its sha256."""
    tensors = {}
    for f in weight_files(src_dir):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key.startswith(AUDIO_PREFIXES):
                    tensors[key] = sf.get_tensor(key)
    if not tensors:
        raise ConfigError(f"{src_dir} holds no audio encoder weights ({', '.join(AUDIO_PREFIXES)}*)")
    save_file(tensors, str(dst), metadata={"format": "pt"})
    digest = hashlib.sha256()
    with dst.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_repository(model: str | Path | None, out: str | Path, opts: RepoOptions | None = None) -> Path:
    """Write (or overwrite) ``out/<name>`` for checkpoint ``model`` (None: the demo model);
    returns the model's directory."""
    opts = opts or RepoOptions()
    src = resolve_model_dir(model)
    cfg = MiDashengLMConfig.from_file(src / CONFIG_NAME)
    model_dir = Path(out) / opts.name
    version_dir = model_dir / str(opts.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(triton_model.__file__, version_dir / "model.py")
    shutil.copyfile(src / CONFIG_NAME, version_dir / CONFIG_NAME)
    sha = _copy_audio_weights(src, version_dir / WEIGHTS_NAME)
    text = config_pbtxt(cfg.audio_encoder_config, opts, str(src.resolve()), sha)
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir
