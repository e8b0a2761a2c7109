"""The shipped demo model really captions the synthetic sounds it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.model.checkpoint import DEMO_MODEL_DIR, load_model, resolve_model_dir
from services.training.evaluate import evaluate_dataset
from services.training.synth import generate_dataset

HELD_OUT_SEED = 4242  # never used for the demo model's training (seed 1) or its eval split (seed 2)
MODEL_CARD_SEEDS = ("--seed 1", "--seed 2")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("heldout"), n_clips=200, seed=HELD_OUT_SEED, progress=False
    )


def test_demo_model_is_the_default_and_small() -> None:
    assert resolve_model_dir(None) == DEMO_MODEL_DIR
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 20 * 1024 * 1024
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (DEMO_MODEL_DIR / name).exists(), name
    card = (DEMO_MODEL_DIR / "README.md").read_text()
    assert "not MiDashengLM-7B" in card
    assert all(seed in card for seed in MODEL_CARD_SEEDS)  # the card holds the exact training command
    assert (
        HELD_OUT_SEED != 1 and str(HELD_OUT_SEED) not in card.split("midasheng train", 1)[-1].split("\n")[0]
    )
    load_model(None)  # loads in the published layout


def test_demo_model_scores_on_unseen_seed(held_out: Path, tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    scores = evaluate_dataset(held_out, None, results_path=results, batch_size=32, device="cpu")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 200 == scores["count"]
    wrong = [r for r in rows if not r["exact"]][:10]
    assert scores["exact_match"] >= 0.90, (scores, wrong)
    assert scores["type_f1"] >= 0.95, (scores, wrong)
