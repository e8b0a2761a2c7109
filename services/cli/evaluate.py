"""``midasheng eval``: exact-match and word-overlap scores of a model on a dataset CSV."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.training.evaluate import evaluate_dataset


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on a dataset CSV",
        description="Caption every row of a dataset CSV and print normalized exact match and word-overlap F1 "
        "(plus sound-type accuracy for synthetic data). Per-row results go to --results.",
    )
    p.add_argument("--data", type=Path, required=True, help="dataset CSV (mdl-toolkit layout)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter directory applied to --model")
    p.add_argument("--results", type=Path, default=None, help="per-row JSON lines output")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    scores = evaluate_dataset(
        args.data,
        args.model,
        adapter=args.adapter,
        results_path=args.results,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    print(json.dumps(scores, indent=2))
    return 0
