"""``midasheng train``: full fine-tuning or LoRA on an audio-caption CSV."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.training.train import ARCHITECTURES, DEFAULT_LORA_TARGETS, METHODS, Trainer, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a model (full or LoRA)",
        description="Train on a dataset CSV in the mdl-toolkit layout (audio, system_prompt, user_prompt, "
        "prediction). Loss is on the assistant reply only. Use --model to fine-tune a checkpoint "
        "(default for LoRA: the demo model) or --config to train a new small model from scratch.",
    )
    p.add_argument("--data", type=Path, required=True, help="dataset CSV")
    p.add_argument("--out", type=Path, required=True, help="output directory (checkpoints, metrics, result)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="base checkpoint directory, hub id, or 'demo'")
    src.add_argument(
        "--config",
        dest="architecture",
        choices=sorted(ARCHITECTURES),
        help="train a new model of this size from scratch, with a tokenizer learned from the data",
    )
    p.add_argument(
        "--method", choices=METHODS, default="full", help="full fine-tuning or LoRA (default: full)"
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_LORA_TARGETS),
        help="comma-separated module name suffixes (default: encoder qkv/proj, projector, decoder projections)",
    )
    p.add_argument(
        "--no-merge", dest="merge", action="store_false", help="LoRA: skip writing the merged checkpoint"
    )
    p.add_argument(
        "--lr", dest="learning_rate", type=float, default=1e-4, help="peak learning rate (default: 1e-4)"
    )
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16 = autocast")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate the held-out split every N steps")
    p.add_argument(
        "--eval-fraction", type=float, default=0.05, help="held-out share of the data (default: 0.05)"
    )
    p.add_argument("--eval-data", type=Path, default=None, help="separate held-out CSV instead of a split")
    p.add_argument("--eval-samples", type=int, default=200, help="held-out rows scored per evaluation")
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps"
    )
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--on-bad-rows",
        choices=["skip", "fail"],
        default="skip",
        help="skip rows with missing/unreadable audio or empty captions (reported), or stop",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--vocab-size", type=int, default=512, help="tokenizer size for --config models")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(
        data=args.data,
        out=args.out,
        model=args.model,
        architecture=args.architecture,
        method=args.method,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        merge=args.merge,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        dtype=args.dtype,
        eval_every=args.eval_every,
        eval_fraction=args.eval_fraction,
        eval_data=args.eval_data,
        eval_samples=args.eval_samples,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        seed=args.seed,
        on_bad_rows=args.on_bad_rows,
        device=args.device,
        vocab_size=args.vocab_size,
        progress=not args.quiet,
    )
    result = Trainer(cfg).train()
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "succeeded" else 1
