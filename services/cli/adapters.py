"""``midasheng adapters list|export``: the adapter registry (Redis) and merged checkpoints."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from services.jobs.store import JobStore
from services.runtime import redis_url_from


def run(args: argparse.Namespace) -> int:
    store = JobStore.from_url(redis_url_from(args.redis_url))
    try:
        if args.action == "list":
            token = ""
            while True:
                page, token = store.list_adapters(100, token, args.base_model or "")
                for a in page:
                    print(json.dumps(asdict(a)), flush=True)
                if not token:
                    return 0
        adapter = store.get_adapter(args.name)
    finally:
        store.close()
    from services.model.adapters import merge_adapter

    out = merge_adapter(adapter.base_model, adapter.path, args.out)
    print(f"merged adapter {adapter.name!r} into {adapter.base_model}: {out}", flush=True)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list trained adapters; export one merged into a full checkpoint")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    li = actions.add_parser("list", help="registered adapters, newest first (one JSON object a line)")
    li.add_argument("--base-model", default=None, help="only adapters trained on this base model")
    ex = actions.add_parser(
        "export", help="merge an adapter into its base model (published checkpoint layout)"
    )
    ex.add_argument("name", metavar="NAME")
    ex.add_argument("--out", type=Path, required=True, help="output directory")
    for a in (li, ex):
        a.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
        a.set_defaults(func=run)
