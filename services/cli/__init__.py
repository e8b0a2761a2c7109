"""The ``midasheng`` command line: one subcommand per module, each with its own help."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from services.errors import MidashengError


def build_parser() -> argparse.ArgumentParser:
    from services.cli import (
        adapters,
        caption,
        encoder,
        evaluate,
        gateway,
        health,
        jobs,
        keys,
        lm,
        monitor,
        stream,
        synth,
        train,
        triton_repo,
        up,
        watch,
    )

    parser = argparse.ArgumentParser(
        prog="midasheng",
        description="Live and offline general audio captioning with MiDashengLM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (
        up,
        caption,
        stream,
        watch,
        monitor,
        synth,
        train,
        evaluate,
        gateway,
        encoder,
        triton_repo,
        lm,
        jobs,
        keys,
        adapters,
        health,
    ):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except MidashengError as e:
        print(f"midasheng {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"midasheng {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
