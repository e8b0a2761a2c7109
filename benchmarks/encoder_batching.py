"""Streaming encoder throughput: micro-batching across sessions vs one window at a time.

N live sessions push 100 ms chunks in turn (from N threads, as N gateway calls would); each
session publishes every 2 s of audio. Measured: seconds of audio encoded per wall-clock second
with the batcher's cross-session micro-batching (``--max-batch``) and, as the baseline in the same
run, with ``max_batch=1``. Publications go to an in-memory sink (no Redis), so this isolates the
encoder service's own work.

    python benchmarks/encoder_batching.py --sessions 8 --seconds 20 [--model DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder_service.backends import TorchBackend  # noqa: E402
from encoder_service.batcher import EncoderBatcher  # noqa: E402
from encoder_service.sessions import EncoderSessions  # noqa: E402
from services.constants import SAMPLE_RATE
from services.model.checkpoint import load_model  # noqa: E402

CHUNK = 1600  # samples, 100 ms


def run(model, sessions: int, seconds: float, max_batch: int) -> float:  # type: ignore[no-untyped-def]
    published = []
    batcher = EncoderBatcher(TorchBackend(model.audio_encoder), max_batch=max_batch, max_wait_ms=5.0)
    batcher.start()
    enc = EncoderSessions(model, batcher, lambda sid, payload: published.append(len(payload)))
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    for i in range(sessions):
        enc.open(f"s{i}", 2.0)

    def feed(i: int) -> None:
        for k, start in enumerate(range(0, audio.size, CHUNK)):
            enc.push(f"s{i}", k + 1, audio[start : start + CHUNK])
        enc.close(f"s{i}", flush=True)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=feed, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    batcher.stop()
    assert published, "nothing was published"
    return sessions * seconds / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per session")
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device(args.device)
    model = load_model(
        args.model, dtype="bfloat16" if dev.type == "cuda" else "float32", device=dev, audio_only=True
    )
    run(model, 2, 4.0, args.max_batch)  # warm-up
    batched = run(model, args.sessions, args.seconds, args.max_batch)
    baseline = run(model, args.sessions, args.seconds, 1)
    card = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "device": card,
                "model": args.model or "demo",
                "sessions": args.sessions,
                "audio_seconds_per_session": args.seconds,
                "audio_seconds_per_second_batched": round(batched, 1),
                "audio_seconds_per_second_unbatched_baseline": round(baseline, 1),
                "ratio": round(batched / baseline, 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
