"""Audio-caption datasets in the mdl-toolkit CSV layout: ``audio, system_prompt, user_prompt, prediction``.

Rows are validated up front (row numbers count data rows from 1, the header excluded); audio is
read from disk one item at a time, never all at once.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from services.audio.io import decode_audio
from services.constants import DEFAULT_PROMPT, SAMPLE_RATE
from services.errors import AudioDecodeError, DatasetError
from services.model.processor import MiDashengProcessor, ModelInputs, build_prompt

COLUMNS = ("audio", "system_prompt", "user_prompt", "prediction")
ON_ERROR = ("skip", "fail")


@dataclass(frozen=True)
class Row:
    row: int  # 1-based data row number in the CSV
    audio: str  # absolute path or URL
    system_prompt: str
    user_prompt: str
    prediction: str
    seconds: float = 0.0  # audio duration when known (used to batch clips of similar length)


def _probe_audio(path: str) -> tuple[str | None, float]:
    """(problem or None, duration in seconds): header only, full decode for non-libsndfile formats."""
    if "://" in path:
        return None, 0.0  # URLs are fetched when read
    p = Path(path)
    if not p.is_file():
        return f"audio file {path} does not exist", 0.0
    try:
        info = sf.info(str(p))
    except Exception:  # not a libsndfile format (mp3, m4a, ...): decode it to be sure
        try:
            return None, len(decode_audio(p)) / SAMPLE_RATE
        except AudioDecodeError as e:
            return str(e), 0.0
    if info.frames <= 0:
        return f"audio file {path} holds no samples", 0.0
    return None, info.frames / info.samplerate


def read_dataset(
    csv_path: str | Path, on_error: str = "skip", check_audio: bool = True
) -> tuple[list[Row], list[tuple[int, str]]]:
    """Parse and validate a dataset CSV.

    Returns (good rows, problems). With ``on_error="fail"`` any problem raises :class:`DatasetError`
    listing every bad row; with ``"skip"`` bad rows are left out and reported.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}")
    path = Path(csv_path)
    if not path.is_file():
        raise DatasetError(f"Dataset {path} does not exist.")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("audio", "prediction") if c not in header]
        if missing:
            raise DatasetError(f"Dataset {path} lacks the columns {missing}; expected {list(COLUMNS)}.")
        rows: list[Row] = []
        problems: list[tuple[int, str]] = []
        for i, rec in enumerate(reader, start=1):
            audio = (rec.get("audio") or "").strip()
            prediction = (rec.get("prediction") or "").strip()
            row_problems = []
            if not audio:
                row_problems.append("empty audio path")
            if not prediction:
                row_problems.append("empty prediction (caption)")
            if audio and "://" not in audio and not Path(audio).is_absolute():
                audio = str((path.parent / audio).resolve())
            seconds = 0.0
            if audio and check_audio:
                problem, seconds = _probe_audio(audio)
                if problem:
                    row_problems.append(problem)
            if row_problems:
                problems.extend((i, p) for p in row_problems)
                continue
            rows.append(
                Row(
                    row=i,
                    audio=audio,
                    system_prompt=(rec.get("system_prompt") or "").strip(),
                    user_prompt=(rec.get("user_prompt") or "").strip() or DEFAULT_PROMPT,
                    prediction=prediction,
                    seconds=seconds,
                )
            )
    if problems and on_error == "fail":
        listed = "; ".join(f"row {r}: {msg}" for r, msg in problems[:20])
        more = f"; ... ({len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DatasetError(f"Dataset {path} has {len(problems)} bad rows: {listed}{more}", problems)
    if not rows:
        raise DatasetError(f"Dataset {path} has no usable rows.", problems)
    return rows, problems


def merge_datasets(out_csv: str | Path, *csv_paths: str | Path) -> Path:
    """Concatenate dataset CSVs into one (audio paths made absolute, so the result can live anywhere)."""
    out = Path(out_csv)
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for part in map(Path, csv_paths):
            with part.open(newline="", encoding="utf-8") as src:
                for rec in csv.DictReader(src):
                    audio = rec.get("audio") or ""
                    if audio and "://" not in audio and not Path(audio).is_absolute():
                        audio = str((part.parent / audio).resolve())
                    w.writerow([audio, *(rec.get(c) or "" for c in COLUMNS[1:])])
    return out


def split_rows(
    rows: Sequence[Row], eval_fraction: float, seed: int, max_eval: int = 200
) -> tuple[list[Row], list[Row]]:
    """Deterministic held-out split (at most ``max_eval`` rows, at least one training row)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError("eval_fraction must be within [0, 1).")
    n_eval = min(max_eval, int(len(rows) * eval_fraction))
    order = np.random.default_rng(seed).permutation(len(rows))
    held = {int(i) for i in order[:n_eval]}
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_row_audio(row: Row) -> np.ndarray:
    return decode_audio(row.audio)


def prompt_for(row: Row) -> str:
    return build_prompt(row.user_prompt, row.system_prompt or None)


def collate(processor: MiDashengProcessor, rows: Sequence[Row], with_answers: bool = True) -> ModelInputs:
    audios = [load_row_audio(r) for r in rows]
    answers = [r.prediction for r in rows] if with_answers else None
    return processor([prompt_for(r) for r in rows], audios, answers)


class EpochSampler:
    """Seeded batches per epoch, resumable at any (epoch, batch) position.

    Each epoch shuffles the rows, sorts pools of ``bucket`` batches by duration so a batch holds
    clips of similar length (less padding), then shuffles the batch order.
    """

    def __init__(self, seconds: Sequence[float], seed: int, bucket: int = 16) -> None:
        self.seconds, self.seed, self.bucket = list(seconds), seed, bucket

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = [int(i) for i in rng.permutation(len(self.seconds))]
        usable = max(batch_size, len(order) // batch_size * batch_size)  # drop the ragged tail
        order = order[:usable]
        pool = batch_size * self.bucket
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: self.seconds[i])
            batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
        return [batches[int(i)] for i in rng.permutation(len(batches))]

    def batches(
        self, batch_size: int, start_epoch: int = 0, start_batch: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[int, int, list[int]]]:
        """Yields (epoch, batch index in epoch, row indices) forever, from the given position.

        With ``world`` data-parallel ranks, rank r takes the global batches b with b % world == r
        (every rank gets as many per epoch: the ragged tail is dropped)."""
        epoch, b = start_epoch, start_batch
        while True:
            per_epoch = self.epoch_batches(epoch, batch_size)
            usable = max(world, len(per_epoch) // world * world)
            while b < usable:
                if b % world == rank:
                    yield epoch, b, per_epoch[b % len(per_epoch)]
                b += 1
            epoch, b = epoch + 1, 0


def prefetch(
    rows: Sequence[Row], processor: MiDashengProcessor, batches: Iterator[tuple[int, int, list[int]]]
) -> Iterator[tuple[int, int, ModelInputs]]:
    """Collate batches in a background thread so disk reads overlap compute (bounded: 2 ahead)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def work() -> None:
        try:
            for epoch, b, idx in batches:
                item = (epoch, b, collate(processor, [rows[i] for i in idx]))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surfaced in the consumer (if it is still there)
            try:
                q.put(e, timeout=5)
            except queue.Full:
                pass

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get(timeout=600)
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
