"""``midasheng synth``: the synthetic audio-caption dataset generator."""

from __future__ import annotations

import argparse

from services.training.synth import add_cli


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_cli(sub)
