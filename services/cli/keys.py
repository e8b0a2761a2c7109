"""``midasheng keys add|list|revoke FILE``: the API keys file of a gateway or jobs API.

The file holds SHA-256 hashes only; ``add`` prints the new key once. Servers re-read the file
when it changes, so ``revoke`` takes effect at the next call without a restart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.security import SCOPES, add_key, parse_keys, remove_keys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="manage API keys (tenants and scopes) of a gateway or jobs API",
        description="Add, list and revoke API keys in a keys file (JSON; hashes only). Scopes: "
        f"{', '.join(SCOPES)} (admin implies every other one).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("add", help="create a key for a tenant; prints the key once")
    a.add_argument("file", type=Path, metavar="FILE")
    a.add_argument("--tenant", required=True, help="who the key belongs to (letters, digits, . _ -)")
    a.add_argument(
        "--scopes", default="stream,caption,monitor", help="comma-separated (default: stream,caption,monitor)"
    )
    ls = actions.add_parser("list", help="list tenants, scopes and key ids (never the keys)")
    ls.add_argument("file", type=Path, metavar="FILE")
    r = actions.add_parser("revoke", help="remove every key of a tenant, or one key by its id")
    r.add_argument("file", type=Path, metavar="FILE")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", default="")
    who.add_argument("--key-id", default="", help="the id `list` shows (the hash's first characters)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        key, entry = add_key(args.file, args.tenant, [s for s in args.scopes.split(",") if s])
        print(key)
        print(f"# tenant {entry.tenant}, scopes {','.join(sorted(entry.scopes))}, id {entry.key_id}")
    elif args.action == "list":
        for k in parse_keys(args.file.read_text(), str(args.file)):
            print(json.dumps({"tenant": k.tenant, "scopes": sorted(k.scopes), "id": k.key_id}))
    else:
        n = remove_keys(args.file, tenant=args.tenant, key_id=args.key_id)
        print(f"revoked {n} key(s)")
        return 0 if n else 1
    return 0
