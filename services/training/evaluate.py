"""Score a model on a dataset: exact match, word F1 and (for synthetic data) sound-type scores."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from services.captioner import pick_device
from services.model.checkpoint import load_model, load_tokenizer, resolve_model_dir
from services.model.generation import GenerationOptions, generate
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor
from services.training.data import collate, read_dataset
from services.training.metrics import corpus_scores, exact_match, word_f1
from services.training.synth import types_in_caption


def type_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Micro precision/recall/F1 of the sound types named, and recall per type."""
    hit = Counter[str]()
    ref_total = Counter[str]()
    pred_total = 0
    for p, r in zip(predictions, references, strict=True):
        pt, rt = Counter(types_in_caption(p)), Counter(types_in_caption(r))
        hit.update(pt & rt)
        ref_total.update(rt)
        pred_total += sum(pt.values())
    matched, n_ref = sum(hit.values()), sum(ref_total.values())
    precision = matched / pred_total if pred_total else 0.0
    recall = matched / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_type = {t: round(hit[t] / n, 4) for t, n in sorted(ref_total.items())}
    return {
        "type_precision": precision,
        "type_recall": recall,
        "type_f1": f1,
        "type_recall_by_type": per_type,
    }


def caption_rows(
    model: MiDashengLM,
    processor: MiDashengProcessor,
    rows: Sequence[Any],
    batch_size: int = 16,
    progress: bool = False,
    max_new_tokens: int = 48,
) -> list[str]:
    preds: list[str] = []
    opts = GenerationOptions(max_new_tokens=max_new_tokens)
    for i in tqdm(range(0, len(rows), batch_size), desc="evaluating", unit="batch", disable=not progress):
        batch = collate(processor, rows[i : i + batch_size], with_answers=False)
        ids = generate(model, batch, processor.stop_ids(), opts, pad_id=processor.pad_id)
        preds.extend(processor.decode(r) for r in ids)
    return preds


def evaluate_dataset(
    data: str | Path,
    model_dir: str | Path | None = None,
    adapter: str | Path | None = None,
    results_path: str | Path | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    rows, problems = read_dataset(data, on_error="skip")
    rows = rows[:limit] if limit else rows
    path = resolve_model_dir(str(model_dir) if model_dir is not None else None)
    dev = pick_device(device)
    model = load_model(path, device=dev)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()  # type: ignore[assignment]
    processor = MiDashengProcessor(load_tokenizer(path), model.config)
    preds = caption_rows(model, processor, rows, batch_size, progress)
    refs = [r.prediction for r in rows]
    scores: dict[str, Any] = {
        **corpus_scores(preds, refs),
        **type_scores(preds, refs),
        "skipped_rows": len(problems),
    }
    if results_path is not None:
        with Path(results_path).open("w") as f:
            for r, p in zip(rows, preds, strict=True):
                f.write(
                    json.dumps(
                        {
                            "row": r.row,
                            "audio": r.audio,
                            "reference": r.prediction,
                            "prediction": p,
                            "exact": exact_match(p, r.prediction),
                            "word_f1": round(word_f1(p, r.prediction), 4),
                        }
                    )
                    + "\n"
                )
    return scores
