"""Reproducibility: the commands in the demo model's card retrain it from scratch on the CPU."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.model.checkpoint import DEMO_MODEL_DIR
from services.training.evaluate import evaluate_dataset
from services.training.synth import generate_dataset

TIME_LIMIT_S = 40 * 60  # two CPU cores, data generation included


def documented_commands() -> list[list[str]]:
    """The ``midasheng ...`` lines of the model card's retraining block."""
    card = (DEMO_MODEL_DIR / "README.md").read_text()
    block = re.search(r"<!-- retrain -->\s*```bash\n(.*?)```", card, re.S)
    assert block, "the model card has no retraining block"
    text = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip().startswith("midasheng ")]


def test_card_documents_synth_and_train() -> None:
    cmds = documented_commands()
    assert [c[1] for c in cmds] == ["synth", "synth", "train"]
    assert "--config" in cmds[-1] and "demo" in cmds[-1]


@pytest.mark.slow
@pytest.mark.timeout(TIME_LIMIT_S + 600)
def test_documented_command_retrains_from_scratch(tmp_path: Path) -> None:
    t0 = time.monotonic()
    for cmd in documented_commands():
        args = [
            sys.executable,
            "-m",
            "services",
            *cmd[1:],
            *(["--quiet"] if cmd[1] in ("train", "synth") else []),
        ]
        res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=TIME_LIMIT_S)
        assert res.returncode == 0, (cmd, res.stderr[-2000:])
    elapsed = time.monotonic() - t0
    assert elapsed < TIME_LIMIT_S
    model_dir = next(tmp_path.glob("runs/*/model"))
    held_out = generate_dataset(tmp_path / "unseen", n_clips=200, seed=4242, progress=False)
    scores = evaluate_dataset(held_out, model_dir, batch_size=32, device="cpu")
    assert scores["exact_match"] >= 0.85, (scores, f"{elapsed:.0f} s")
