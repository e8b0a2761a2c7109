"""Live caption updates per second: the batched engine vs the reference engine, same requests, same run.

N simulated live streams at a 1 s hop with a 10 s window and SEGMENT interims (the default):
every second each stream asks for the caption of its open segment so far, with exactly the audio
tokens the streaming encoder would have published by then (the offline encoding of the audio so
far; streaming = offline). A round submits every stream's update and waits for all of them.

Scenes: ``stable`` (one sound for the whole stream: the caption rarely changes) and ``changing``
(a new synthetic scene every 3 s). Models: ``demo`` (the shipped demo model) and ``mid`` (a
random decoder of Qwen2-0.5B's shape, 24 layers x 896, on the demo encoder and tokenizer).

    python benchmarks/engine_live.py --streams 1 8 32 128 --seconds 20
    python benchmarks/engine_live.py --model mid --streams 1 8 32 --seconds 12
    python benchmarks/engine_live.py --offline 64      # offline clips/s as well
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_service.engines import make_engine  # noqa: E402
from lm_service.engines.base import CaptionEngine, CaptionRequest  # noqa: E402
from lm_service.engines.limits import EngineLimits  # noqa: E402
from lm_service.offline import Captioner  # noqa: E402
from services.constants import SAMPLE_RATE, TOKENS_PER_SECOND  # noqa: E402
from services.model.config import MiDashengLMConfig  # noqa: E402
from services.model.generation import GenerationOptions  # noqa: E402
from services.model.loading import LoadedModel, load_pretrained  # noqa: E402
from services.model.modeling import MiDashengLM  # noqa: E402
from services.training.synth import SOUND_TYPES, render_sound  # noqa: E402

WINDOW_TOKENS = 50  # 10 s
HOP_TOKENS = 5  # 1 s
OPTIONS = GenerationOptions(max_new_tokens=32)
SOURCES = 8  # distinct audio sources, cycled over the streams


def mid_model(demo: LoadedModel) -> LoadedModel:
    """A random decoder shaped like Qwen2-0.5B on the demo encoder and tokenizer."""
    cfg = demo.model.config
    text = dict(cfg.text_config)
    text.update(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
    )
    mid_cfg = dataclasses.replace(cfg, text_config=text)
    torch.manual_seed(0)
    model = MiDashengLM(MiDashengLMConfig.from_dict(mid_cfg.to_dict()))
    model.audio_encoder.load_state_dict(demo.model.audio_encoder.state_dict())
    return LoadedModel(model.eval(), demo.processor, demo.path)


def source_audio(kind: str, seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = sorted(n for n in SOUND_TYPES if n != "silence")
    n = int(seconds * SAMPLE_RATE)
    if kind == "stable":
        return render_sound(names[seed % len(names)], rng, n) * 0.5
    piece = 3 * SAMPLE_RATE
    parts = [
        render_sound(names[int(rng.integers(len(names)))], rng, piece) * 0.5 for _ in range(-(-n // piece))
    ]
    return np.concatenate(parts)[:n].astype(np.float32)


def stream_windows(engine: CaptionEngine, audio: np.ndarray, seconds: int) -> list[tuple[int, torch.Tensor]]:
    """(audio_start, tokens of the open segment so far) at every hop, as the live path sees them."""
    out = []
    for t in range(1, seconds + 1):
        tokens = engine.encode_audio([torch.from_numpy(audio[: t * SAMPLE_RATE])])[0]
        end = tokens.shape[0]
        start = (end - 1) // WINDOW_TOKENS * WINDOW_TOKENS
        out.append((start, tokens[start:end]))
    return out


def run_live(
    engine: CaptionEngine, windows: list[list[tuple[int, torch.Tensor]]], n: int
) -> dict[str, float]:
    rounds = len(windows[0])
    latencies = []
    before = engine.stats()
    t0 = time.perf_counter()
    for r in range(rounds):
        reqs = [
            CaptionRequest(
                windows[i % len(windows)][r][1],
                options=OPTIONS,
                stream=f"s{i}",
                audio_start=windows[i % len(windows)][r][0],
            )
            for i in range(n)
        ]
        t = time.perf_counter()
        for f in engine.submit(reqs):
            f.result(600)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    for i in range(n):
        engine.end_stream(f"s{i}")
    after = engine.stats()
    prompt = after.prompt_tokens - before.prompt_tokens
    computed = after.computed_prompt_tokens - before.computed_prompt_tokens
    drafts = after.draft_tokens - before.draft_tokens
    return {
        "updates_per_s": n * rounds / elapsed,
        "round_p50_ms": statistics.median(latencies) * 1e3,
        "round_max_ms": max(latencies) * 1e3,
        "prefilled_share": computed / prompt if prompt else 1.0,
        "draft_acceptance": (after.accepted_tokens - before.accepted_tokens) / drafts if drafts else 0.0,
    }


def run_offline(loaded: LoadedModel, kind: str, clips: list[np.ndarray]) -> float:
    captioner = Captioner(make_engine(kind, loaded, limits=EngineLimits(kv_cache_mb=512)))
    try:
        captioner.caption(clips[:4])  # warm up
        t = time.perf_counter()
        captioner.caption(clips)
        return len(clips) / (time.perf_counter() - t)
    finally:
        captioner.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "mid"], default="demo")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=int, default=20, help="stream length (rounds of 1 s)")
    ap.add_argument("--scenes", nargs="+", default=["stable", "changing"])
    ap.add_argument("--offline", type=int, default=0, help="also caption this many 10 s clips offline")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = load_pretrained(None, "cpu")
    loaded = mid_model(demo) if args.model == "mid" else demo
    engines = {
        "batched": make_engine("batched", loaded, limits=EngineLimits(kv_cache_mb=512)),
        "reference": make_engine("reference", loaded, max_batch=128),
    }
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU only"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name()
    )
    print(
        f"model: {args.model}; window {WINDOW_TOKENS / TOKENS_PER_SECOND:.0f} s, hop "
        f"{HOP_TOKENS / TOKENS_PER_SECOND:.0f} s, SEGMENT interims, {OPTIONS.max_new_tokens} new tokens at most"
    )
    results = []
    for scene in args.scenes:
        sources = [source_audio(scene, s, args.seconds) for s in range(SOURCES)]
        windows = [stream_windows(engines["batched"], a, args.seconds) for a in sources]
        for n in args.streams:
            row: dict[str, object] = {"scene": scene, "streams": n}
            for name, engine in engines.items():
                run_live(engine, [w[:2] for w in windows], min(n, 4))  # warm up
                row[name] = run_live(engine, windows, n)
            ratio = row["batched"]["updates_per_s"] / row["reference"]["updates_per_s"]  # type: ignore[index]
            row["ratio"] = ratio
            results.append(row)
            b, r = row["batched"], row["reference"]
            print(
                f"{scene:9s} {n:4d} streams: batched {b['updates_per_s']:8.1f} updates/s "  # type: ignore[index]
                f"(p50 round {b['round_p50_ms']:7.1f} ms, prefilled {b['prefilled_share']:.0%}, "  # type: ignore[index]
                f"draft acceptance {b['draft_acceptance']:.0%}) | reference {r['updates_per_s']:8.1f} "  # type: ignore[index]
                f"updates/s (p50 round {r['round_p50_ms']:7.1f} ms) | x{ratio:.2f}",
                flush=True,
            )  # type: ignore[index]
    if args.offline:
        rng = np.random.default_rng(99)
        clips = [source_audio("changing", int(rng.integers(1 << 30)), 10.0) for _ in range(args.offline)]
        for kind in engines:
            engines[kind].close()
        offline = {kind: run_offline(loaded, kind, clips) for kind in ("batched", "reference")}
        print(
            f"offline, {args.offline} clips of 10 s: batched {offline['batched']:.1f} clips/s, reference "
            f"{offline['reference']:.1f} clips/s, x{offline['batched'] / offline['reference']:.2f}"
        )
        results.append({"offline_clips_per_s": offline})
    else:
        for e in engines.values():
            e.close()
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
