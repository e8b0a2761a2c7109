"""Flags that several service commands share."""

from __future__ import annotations

import argparse

from services.model.loading import DTYPES


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N (default: auto = cuda when there is one)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weights dtype (default: bfloat16 on CUDA, else float32)",
    )


def add_server_flags(p: argparse.ArgumentParser, listen: str) -> None:
    p.add_argument("--listen", default=listen, help=f"gRPC address (default: {listen})")
    p.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
