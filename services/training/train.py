"""Training loop: full fine-tuning or LoRA (peft) on an audio-caption CSV, resumable.

Output layout under ``out``:
  model/                 full fine-tune or from-scratch result in the published checkpoint layout
  adapter/               LoRA result (peft format: adapter_config.json + adapter_model.safetensors)
  merged/                LoRA merged into the base model, published layout (with ``merge=True``)
  checkpoints/step-N/    periodic checkpoints: weights or adapter + trainer_state.pt
  metrics.jsonl          one JSON object per logged step / eval
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from services.errors import CheckpointError, ConfigError
from services.model.adapters import merge_adapter
from services.model.checkpoint import build_model, load_model, load_tokenizer, resolve_model_dir, save_model
from services.model.config import tiny_config
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor
from services.training.data import EpochSampler, Row, prefetch, read_dataset, split_rows
from services.training.distributed import Dist
from services.training.evaluate import caption_rows
from services.training.metrics import corpus_scores

# LoRA targets from the paper's recipe: encoder attention, the projector, every decoder projection.
DEFAULT_LORA_TARGETS = (
    "attn.qkv",
    "attn.proj",
    "audio_projector.net.0",
    "audio_projector.net.2",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
METHODS = ("full", "lora")
# Architectures for models trained from scratch (``--config``): same layout as the real model.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "tiny": dict(
        encoder_dim=32,
        encoder_depth=1,
        encoder_heads=2,
        hidden_size=32,
        layers=1,
        heads=2,
        kv_heads=1,
        intermediate_size=64,
    ),
    "demo": dict(
        encoder_dim=128,
        encoder_depth=3,
        encoder_heads=4,
        hidden_size=160,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate_size=384,
    ),
}
STATE_FILE = "trainer_state.pt"


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_rng_state(s: dict[str, Any]) -> None:
    np.random.set_state(
        (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
    )


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    model: str | None = None  # base checkpoint (dir / hub id / "demo"); None with ``architecture``
    architecture: str | None = None  # "tiny" | "demo": new model + tokenizer trained on the data
    method: str = "full"
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    merge: bool = True  # LoRA: also write merged/ in the published layout
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # "bfloat16": autocast; master weights stay fp32
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    eval_fraction: float = 0.05
    eval_data: Path | None = None
    eval_samples: int = 200
    checkpoint_every: int = 0  # optimizer steps; 0 = only the final model
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    on_bad_rows: str = "skip"
    device: str = "auto"
    vocab_size: int = 512
    log_every: int = 10
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if (self.model is None) == (self.architecture is None):
            raise ConfigError(
                "Give exactly one of --model (fine-tune a checkpoint) or --config (train from scratch)."
            )
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise ConfigError(f"Unknown --config {self.architecture!r}; choose from {sorted(ARCHITECTURES)}.")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}.")
        if self.method == "lora" and self.architecture is not None:
            raise ConfigError("LoRA needs a trained base model (--model), not a fresh --config.")
        for name in ("batch_size", "grad_accum", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1.")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate must be positive.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be at least 1.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype must be float32 or bfloat16.")


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """One training run. ``on_event`` receives progress dicts; ``should_stop`` is polled every step."""

    def __init__(
        self,
        cfg: TrainConfig,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.on_event = on_event or (lambda e: None)
        self.should_stop = should_stop or (lambda: False)
        self.dist = Dist.from_env()
        self.device = _device(cfg.device, self.dist.local_rank)
        self._owns_group = self.dist.setup(self.device)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"

        rows, problems = read_dataset(cfg.data, on_error=cfg.on_bad_rows)
        for row, msg in problems:
            self._log({"event": "bad_row", "row": row, "message": msg})
        if cfg.eval_data is not None:
            self.train_rows, self.eval_rows = rows, read_dataset(cfg.eval_data, on_error=cfg.on_bad_rows)[0]
        else:
            self.train_rows, self.eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed, cfg.eval_samples)
        self.eval_rows = self.eval_rows[: cfg.eval_samples]

        torch.manual_seed(cfg.seed)  # same seed on every rank: identical initial weights
        self.model, self.tokenizer = self._build_model()
        self.forward_model: Any = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        self.processor = MiDashengProcessor(self.tokenizer, self.model.config)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.dim() >= 2]
        no_decay = [p for p in self.trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate,
        )
        per_step = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_rows) / per_step))
        self.step = 0
        self.epoch, self.batch_in_epoch = 0, 0

    # --- model construction ---------------------------------------------------------------

    def _build_model(self) -> tuple[MiDashengLM, Any]:
        cfg = self.cfg
        if cfg.architecture is not None:
            from services.training.tokenizer import train_caption_tokenizer

            prompts = sorted(
                {r.user_prompt for r in self.train_rows} | {r.system_prompt for r in self.train_rows} - {""}
            )
            tokenizer = train_caption_tokenizer(
                [r.prediction for r in self.train_rows], prompts, vocab_size=cfg.vocab_size
            )
            mcfg = tiny_config(
                vocab_size=len(tokenizer),
                audio_token_id=tokenizer.get_vocab()["<|AUDIO|>"],
                **ARCHITECTURES[cfg.architecture],
            )
            model = build_model(mcfg, "cpu")
        else:
            base = resolve_model_dir(cfg.model)
            model = load_model(base, dtype="float32", device="cpu")
            tokenizer = load_tokenizer(base)
        model.to(self.device)
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
            )
            model = get_peft_model(model, lora)  # type: ignore[assignment]
        self._train_mode(model)
        return model, tokenizer

    def _train_mode(self, model: Any) -> None:
        """Training mode, except that a pretrained model's ``init_bn`` keeps normalizing with its
        running statistics: batch statistics would train the model on inputs scaled differently from
        what it sees when served, and a LoRA adapter (which stores no BatchNorm state) would be used
        with statistics it was not trained under. A model trained from scratch learns them."""
        model.train()
        if self.cfg.architecture is None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.audio_encoder.init_bn.eval()

    @property
    def base_model(self) -> MiDashengLM:
        """The MiDashengLM inside a peft wrapper (or the model itself)."""
        m: Any = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    # --- checkpoints --------------------------------------------------------------------------

    def _ckpt_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:07d}"

    def save_weights(self, path: Path) -> None:
        if self.cfg.method == "lora":
            self.model.save_pretrained(str(path))  # type: ignore[operator]
        else:
            save_model(self.base_model, path, self.tokenizer)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes; every rank waits until the checkpoint exists."""
        path = self._ckpt_dir(self.step)
        if not self.dist.main:
            self.dist.barrier()
            return path
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.save_weights(tmp)
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            "python_rng": random.getstate(),
            "config": {k: str(v) for k, v in asdict(self.cfg).items()},
        }
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a checkpoint directory exists only once it is complete
        kept = sorted((self.out / "checkpoints").glob("step-???????"))
        for old in kept[: max(0, len(kept) - self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        self._log({"event": "checkpoint", "step": self.step, "path": str(path)})
        self.dist.barrier()
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted(
            p for p in (self.out / "checkpoints").glob("step-???????") if (p / STATE_FILE).exists()
        )
        return found[-1] if found else None

    def restore(self, path: Path) -> None:
        # weights_only: tensors and plain values only; a pickle planted in shared storage cannot run.
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path / STATE_FILE} holds more than tensors and plain values (an older format, or "
                "tampered with); it is not loaded"
            ) from e
        if self.cfg.method == "lora":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        else:
            loaded = load_model(path, dtype="float32", device=self.device)
            self.base_model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        _set_numpy_rng_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        self._log({"event": "resumed", "step": self.step, "path": str(path)})

    # --- loop ------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return  # rank 0 speaks for the run
        record = {"time": round(time.time(), 3), **record}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.on_event(record)

    def _set_lr(self) -> float:
        lr = self.cfg.learning_rate * lr_factor(self.step, self.cfg.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def evaluate(self, rows: list[Row] | None = None, batch_size: int = 16) -> dict[str, float]:
        rows = self.eval_rows if rows is None else rows
        if not rows:
            return {}
        self.model.eval()
        preds = caption_rows(self.base_model, self.processor, rows, batch_size)
        self._train_mode(self.model)
        return corpus_scores(preds, [r.prediction for r in rows])

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.resume:
            # Rank 0 picks the checkpoint and every rank loads that one (a rank that cannot see it
            # fails loudly instead of training from another step).
            latest = self.latest_checkpoint() if self.dist.main else None
            step = self.dist.max_int(int(latest.name.split("-")[1]) if latest is not None else -1)
            if step >= 0:
                self.restore(self._ckpt_dir(step))
        sampler = EpochSampler([r.seconds for r in self.train_rows], cfg.seed)
        batches = sampler.batches(
            cfg.batch_size, self.epoch, self.batch_in_epoch, self.dist.rank, self.dist.world
        )
        stream = prefetch(self.train_rows, self.processor, batches)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        self._log(
            {
                "event": "start",
                "step": self.step,
                "total_steps": self.total_steps,
                "train_rows": len(self.train_rows),
                "eval_rows": len(self.eval_rows),
                "trainable_parameters": sum(p.numel() for p in self.trainable),
            }
        )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not (cfg.progress and self.dist.main),
        )
        started, start_step = time.monotonic(), self.step
        stopped = False
        last: dict[str, Any] = {}
        try:
            while self.step < self.total_steps:
                if self.dist.any(self.dist.main and self.should_stop()):
                    stopped = True
                    break
                lr = self._set_lr()
                loss_sum = 0.0
                for _ in range(cfg.grad_accum):
                    self.epoch, b, batch = next(stream)
                    # Resume point: the first global batch of the next round (all ranks in lock-step).
                    self.batch_in_epoch = b - self.dist.rank + self.dist.world
                    batch = batch.to(self.device)
                    with autocast:
                        out = self.forward_model(
                            input_ids=batch.input_ids,
                            attention_mask=batch.attention_mask,
                            audio=batch.audio,
                            audio_lengths=batch.audio_lengths,
                            audio_token_counts=batch.audio_token_counts,
                            labels=batch.labels,
                        )
                    (out.loss / cfg.grad_accum).backward()
                    loss_sum += float(out.loss.detach())
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                loss = self.dist.mean(loss_sum / cfg.grad_accum)
                done = self.step - start_step
                eta = (time.monotonic() - started) / done * (self.total_steps - self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                last = {
                    "event": "step",
                    "step": self.step,
                    "epoch": self.epoch,
                    "loss": round(loss, 5),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 4),
                    "eta_seconds": round(eta, 1),
                }
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(last)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    if self.dist.main:
                        self._log({"event": "eval", "step": self.step, **self.evaluate()})
                    self.dist.barrier()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        if stopped:
            path = self.save_checkpoint()
            self._log({"event": "stopped", "step": self.step, "checkpoint": str(path)})
            self._close_group()
            return {"status": "stopped", "step": self.step, "checkpoint": str(path)}
        if not self.dist.main:  # rank 0 evaluates and writes the result
            self.dist.barrier()
            self._close_group()
            return {"status": "succeeded", "step": self.step, "rank": self.dist.rank}
        scores = self.evaluate()
        self._log({"event": "eval", "step": self.step, "final": True, **scores})
        result = self.finish()
        self._log({"event": "done", "step": self.step, **result})
        self.dist.barrier()
        self._close_group()
        return {"status": "succeeded", "step": self.step, "scores": scores, **result}

    def _close_group(self) -> None:
        if self._owns_group:
            import torch.distributed

            torch.distributed.destroy_process_group()

    def finish(self) -> dict[str, Any]:
        """Write the final artifacts (model/ or adapter/ + merged/)."""
        if self.cfg.method == "full":
            path = save_model(self.base_model, self.out / "model", self.tokenizer)
            return {"model": str(path)}
        adapter = self.out / "adapter"
        self.model.save_pretrained(str(adapter))  # type: ignore[operator]
        result = {"adapter": str(adapter)}
        if self.cfg.merge:
            result["merged"] = str(merge_adapter(self.cfg.model, adapter, self.out / "merged"))
        return result


def config_from_args(**kwargs: Any) -> TrainConfig:
    cfg = replace(TrainConfig(data=Path(kwargs.pop("data")), out=Path(kwargs.pop("out"))), **kwargs)
    cfg.validate()
    return cfg
