"""LoRA really adapts: the demo model learns a sound it never saw (a siren) and keeps the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_service.engines.batched import BatchedEngine
from lm_service.offline import Captioner
from services.model.adapters import adapters_in_dir, load_with_adapter
from services.model.checkpoint import load_model, load_tokenizer
from services.model.loading import load_pretrained
from services.model.processor import MiDashengProcessor
from services.training.data import load_row_audio, merge_datasets, read_dataset
from services.training.evaluate import caption_rows
from services.training.metrics import corpus_scores
from services.training.synth import DEFAULT_TYPES, generate_dataset, types_in_caption
from services.training.train import DEFAULT_LORA_TARGETS, Trainer, config_from_args

SIREN_MIX = ["siren", "pink_noise", "white_noise", "silence", "low_tone"]


def siren_recall(model, processor, rows) -> float:  # type: ignore[no-untyped-def]
    preds = caption_rows(model, processor, rows, batch_size=32)
    refs = [r.prediction for r in rows]
    hits = sum(
        "siren" in types_in_caption(p)
        for p, r in zip(preds, refs, strict=True)
        if "siren" in types_in_caption(r)
    )
    return hits / sum("siren" in types_in_caption(r) for r in refs)


@pytest.mark.slow
def test_lora_teaches_the_demo_model_a_siren(tmp_path: Path) -> None:
    train = merge_datasets(
        tmp_path / "train.csv",
        generate_dataset(tmp_path / "mix", 240, seed=21, types=[*DEFAULT_TYPES, "siren"], progress=False),
        generate_dataset(tmp_path / "siren", 120, seed=22, types=SIREN_MIX, progress=False),
    )
    siren_eval, _ = read_dataset(
        generate_dataset(tmp_path / "siren_eval", 60, seed=23, types=SIREN_MIX, progress=False)
    )
    siren_eval = [r for r in siren_eval if "siren" in types_in_caption(r.prediction)]
    known_eval, _ = read_dataset(generate_dataset(tmp_path / "known_eval", 120, seed=24, progress=False))
    assert len(siren_eval) >= 20

    base = load_model(None)
    processor = MiDashengProcessor(load_tokenizer(None), base.config)
    before = siren_recall(base, processor, siren_eval)
    assert before <= 0.05  # the demo model never heard a siren

    cfg = config_from_args(
        data=train,
        out=tmp_path / "run",
        model="demo",
        method="lora",
        lora_rank=16,
        lora_alpha=32,
        lora_dropout=0.0,
        learning_rate=2e-3,
        warmup_steps=10,
        max_steps=300,
        batch_size=8,
        eval_fraction=0.0,
        progress=False,
        device="cpu",
        seed=5,
    )
    assert cfg.lora_targets == DEFAULT_LORA_TARGETS  # encoder qkv/proj, projector, decoder projections
    result = Trainer(cfg).train()
    assert result["status"] == "succeeded"

    tuned = load_with_adapter(None, result["adapter"])
    after = siren_recall(tuned, processor, siren_eval)
    known = corpus_scores(
        caption_rows(tuned, processor, known_eval, batch_size=32), [r.prediction for r in known_eval]
    )
    print(f"siren recall {before:.2f} -> {after:.2f}; known types {known}")
    assert after >= 0.80, after
    assert known["exact_match"] >= 0.85, known

    # The merged checkpoint is in the published layout and captions like base + adapter.
    merged = load_model(result["merged"])
    assert set(merged.state_dict()) == set(base.state_dict())
    with torch.inference_mode():
        assert caption_rows(merged, processor, siren_eval[:8]) == caption_rows(
            tuned, processor, siren_eval[:8]
        )

    # Served unmerged by the batched engine (LoRA applied per request beside the base model, the
    # encoder-side part merged into a copy of the encoder for offline clips), the adapter gives the
    # merged model's captions: token for token here, and per layer within 1e-5
    # (tests/lm_service/test_batched_engine.py).
    unmerged = Captioner(
        BatchedEngine(load_pretrained(None, "cpu"), adapters=adapters_in_dir(Path(result["adapter"]).parent))
    )
    try:
        audios = [load_row_audio(r) for r in siren_eval[:12]]
        served = unmerged.caption_clips(audios, adapter=Path(result["adapter"]).name)
        base_served = unmerged.caption_clips(audios)
    finally:
        unmerged.close()
    assert [r.text for r in served] == caption_rows(merged, processor, siren_eval[:12])
    assert [r.text for r in served] != [r.text for r in base_served]  # the adapter is in effect
