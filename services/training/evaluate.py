"""Score a model on a dataset: exact match, word F1 and (for synthetic data) sound-type scores."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from services.constants import DEFAULT_MAX_NEW_TOKENS
from services.model.adapters import merge_into
from services.model.generation import GenerationOptions
from services.model.loading import LoadedModel, load_pretrained
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor
from services.training.data import Row, load_row_audio, read_dataset
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
    rows: Sequence[Row],
    batch_size: int = 16,
    progress: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[str]:
    """Each row's caption by ``model``, through the serving path (offline captioning over the
    reference engine), so that scores measure what is served."""
    from lm_service.engines.reference import ReferenceEngine
    from lm_service.offline import Captioner

    captioner = Captioner(ReferenceEngine(LoadedModel(model, processor, Path(".")), max_batch=batch_size))
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    preds: list[str] = []
    try:
        for i in tqdm(range(0, len(rows), batch_size), desc="evaluating", unit="batch", disable=not progress):
            part = rows[i : i + batch_size]
            by_prompt: dict[tuple[str, str], list[int]] = {}
            for k, r in enumerate(part):
                by_prompt.setdefault((r.user_prompt, r.system_prompt), []).append(k)
            texts = [""] * len(part)
            for (user, system), idx in by_prompt.items():
                audios = [load_row_audio(part[k]) for k in idx]
                results = captioner.caption_clips(audios, user, options, system_prompt=system or None)
                for k, res in zip(idx, results, strict=True):
                    texts[k] = res.text
            preds.extend(texts)
    finally:
        captioner.close()
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
    loaded = load_pretrained(model_dir, device, "float32")
    assert loaded.processor is not None
    model = loaded.model if adapter is None else merge_into(loaded.model, adapter)
    preds = caption_rows(model, loaded.processor, rows, batch_size, progress)
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
