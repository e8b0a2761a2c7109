"""The caption engine on one GPU: the real 7B config with random bf16 weights, batched engine
beside plain transformers (``generate``, eager attention) in the same run. Finishes within
``--budget`` seconds (default 450): parts that do not fit are reported as skipped.

Figures: TTFT for 2-30 s clips at batch 1 (encoder included); one-stream decode tokens/s;
offline clips/s (30 s clips, 100 output tokens, encoder included) over batch sizes; live
capacity = the most streams at a 1 s hop whose update p95 stays <= 1 s, with draft acceptance
fixed at 0 %, 50 % and 90 % (each stream's draft is its true caption with a wrong token at that
fraction of its length).

Random weights never stop early, so every caption runs to its token limit (the worst case).
The 7B tokenizer cannot be downloaded here: a word-level tokenizer with the real special-token
ids stands in for it (prompt lengths within a few tokens of the real ones).

    python benchmarks/gpu_engine.py --json-out gpu_engine.json          # on the GPU machine
    python benchmarks/gpu_engine.py --tiny --device cpu --budget 120    # smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_service.engines.base import CaptionRequest  # noqa: E402
from lm_service.engines.batched import BatchedEngine  # noqa: E402
from lm_service.engines.limits import EngineLimits  # noqa: E402
from services.constants import SAMPLE_RATE  # noqa: E402
from services.model.checkpoint import random_model  # noqa: E402
from services.model.config import MiDashengLMConfig, real_7b_config, tiny_config  # noqa: E402
from services.model.generation import GenerationOptions  # noqa: E402
from services.model.loading import LoadedModel  # noqa: E402
from services.model.modeling import MiDashengLM  # noqa: E402
from services.model.processor import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IM_END, IM_START, MiDashengProcessor  # noqa: E402

WORDS = "caption the audio describe what you hear a an is of and in with sound music speech noise".split()


def stand_in_processor(cfg: MiDashengLMConfig) -> MiDashengProcessor:
    """A word-level tokenizer with the checkpoint's special-token ids (see the module docstring)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    aid = cfg.audio_token_id
    specials = {IM_START: aid - 2, IM_END: aid - 1, AUDIO_TOKEN: aid, AUDIO_BOS: aid + 1, AUDIO_EOS: aid + 2}
    vocab = {w: 100 + i for i, w in enumerate([*WORDS, ".", "?", "\n", "user", "assistant", "system"])}
    vocab["[UNK]"] = 99
    vocab.update(specials)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=IM_END)
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return MiDashengProcessor(fast, cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Baseline:
    """Plain transformers: encode, splice the audio into the prompt embeddings, ``generate`` (eager)."""

    def __init__(self, model: MiDashengLM, processor: MiDashengProcessor) -> None:
        self.model, self.processor = model, processor
        model.decoder.config._attn_implementation = "eager"  # the model's own modules, plain attention

    @torch.inference_mode()
    def caption(self, tokens: list[torch.Tensor], max_new: int) -> list[list[int]]:
        from services.model.processor import build_prompt

        counts = [int(t.shape[0]) for t in tokens]
        ids, attention, _ = self.processor.encode_text([build_prompt()] * len(tokens), counts)
        audio = torch.zeros(
            len(tokens), max(counts), tokens[0].shape[1], dtype=self.model.dtype, device=self.model.device
        )
        for i, t in enumerate(tokens):
            audio[i, : counts[i]] = t
        dev = self.model.device
        embeds = self.model.embed_inputs(ids.to(dev), audio, torch.tensor(counts, device=dev))
        out = self.model.decoder.generate(
            inputs_embeds=embeds,
            attention_mask=attention.to(dev),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=self.processor.pad_id,
        )
        return [row.tolist() for row in out]


def main() -> int:  # noqa: C901 - one script, one report
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test of the script)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    t_start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; run on a GPU machine or pass --tiny --device cpu.", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = tiny_config() if args.tiny else real_7b_config()
    torch.manual_seed(0)
    model = random_model(cfg, device, dtype)
    processor = stand_in_processor(cfg)
    loaded = LoadedModel(model, processor, Path("."))
    engine = BatchedEngine(loaded, EngineLimits(kv_memory_fraction=0.6, max_running=2048, max_waiting=65536))
    baseline = Baseline(model, processor)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "card": card,
        "model": "tiny" if args.tiny else "midashenglm-7b config, random bf16 weights",
        "torch": torch.__version__,
        "kv_pool_tokens": engine.pool.capacity_tokens,
        "skipped": [],
    }

    def left() -> float:
        return args.budget - (time.monotonic() - t_start)

    def encode(seconds: float, n: int = 1) -> list[torch.Tensor]:
        clips = [torch.randn(int(seconds * SAMPLE_RATE)) * 0.1 for _ in range(n)]
        return engine.encode_audio(clips)

    # 1. TTFT at batch 1 (encoder included) and one-stream decode speed.
    ttft: dict[str, dict[str, float]] = {}
    for seconds in (2, 5, 10, 20, 30):
        clip = torch.randn(int(seconds * SAMPLE_RATE)) * 0.1
        runs: dict[str, list[float]] = {"batched": [], "transformers": []}
        for rep in range(4):
            sync(device)
            t = time.perf_counter()
            tok = engine.encode_audio([clip])[0]
            engine.submit([CaptionRequest(tok, options=GenerationOptions(max_new_tokens=1))])[0].result(120)
            if rep:
                runs["batched"].append((time.perf_counter() - t) * 1e3)
            sync(device)
            t = time.perf_counter()
            tok = engine.encode_audio([clip])[0]
            baseline.caption([tok], 1)
            sync(device)
            if rep:
                runs["transformers"].append((time.perf_counter() - t) * 1e3)
        ttft[f"{seconds}s"] = {k: round(statistics.median(v), 2) for k, v in runs.items()}
        print(
            f"TTFT {seconds:2d} s: batched {ttft[f'{seconds}s']['batched']:.1f} ms, "
            f"transformers {ttft[f'{seconds}s']['transformers']:.1f} ms",
            flush=True,
        )
    report["ttft_ms"] = ttft
    tok = encode(10.0)[0]
    n_dec = 200
    t = time.perf_counter()
    engine.submit([CaptionRequest(tok, options=GenerationOptions(max_new_tokens=n_dec))])[0].result(600)
    dec_b = n_dec / (time.perf_counter() - t)
    sync(device)
    t = time.perf_counter()
    baseline.caption([tok], n_dec)
    sync(device)
    dec_t = n_dec / (time.perf_counter() - t)
    report["decode_tokens_per_s_one_stream"] = {"batched": round(dec_b, 1), "transformers": round(dec_t, 1)}
    print(f"decode, one stream: batched {dec_b:.0f} tokens/s, transformers {dec_t:.0f} tokens/s", flush=True)

    # 2. Offline clips/s: 30 s clips, 100 output tokens, encoder included.
    offline: dict[str, dict[str, float]] = {}
    for batch in (1, 8, 32, 128, 256, 512):
        if left() < 200:
            report["skipped"].append(f"offline batch {batch}")
            continue
        clips = [torch.randn(30 * SAMPLE_RATE) * 0.1 for _ in range(batch)]
        opts = GenerationOptions(max_new_tokens=100)
        sync(device)
        t = time.perf_counter()
        toks = engine.encode_audio(clips)
        for f in engine.submit([CaptionRequest(x, options=opts) for x in toks]):
            f.result(600)
        row = {"batched": batch / (time.perf_counter() - t)}
        if batch <= 64:
            sync(device)
            t = time.perf_counter()
            toks = engine.encode_audio(clips)
            baseline.caption(toks, 100)
            sync(device)
            row["transformers"] = batch / (time.perf_counter() - t)
        offline[str(batch)] = {k: round(v, 2) for k, v in row.items()}
        print(
            f"offline batch {batch:3d}: " + ", ".join(f"{k} {v:.2f} clips/s" for k, v in row.items()),
            flush=True,
        )
    report["offline_clips_per_s"] = offline

    # 3. Live capacity at a 1 s hop with fixed draft acceptance.
    capacity: dict[str, int] = {}
    window_tokens, max_new = 50, 48
    ladder = [16, 64] if args.tiny else [64, 128, 256, 512, 768, 1024, 1536, 2048]
    for acceptance in (0.0, 0.5, 0.9):
        best = 0
        for n in ladder:
            if left() < 40:
                report["skipped"].append(f"live n={n} acceptance={acceptance}")
                break
            audio = [
                torch.randn(window_tokens, cfg.hidden_size, dtype=dtype, device=device) for _ in range(n)
            ]
            truth = [
                list(f.result(600).token_ids)
                for f in engine.submit(
                    [CaptionRequest(a, options=GenerationOptions(max_new_tokens=max_new)) for a in audio]
                )
            ]
            drafts = []
            for g in truth:
                k = int(acceptance * len(g))
                drafts.append(tuple(g[:k]) + tuple((x + 1) % 1000 for x in g[k:]))
            latencies: list[float] = []
            lock = threading.Lock()
            seconds = 8
            t0 = time.monotonic()
            pending = []
            for hop in range(seconds):
                for i in range(n):  # spread each hop's updates over the second
                    due = t0 + hop + i / n
                    while time.monotonic() < due:
                        time.sleep(max(0.0, min(0.002, due - time.monotonic())))
                    sent = time.monotonic()
                    req = CaptionRequest(
                        audio[i],
                        options=GenerationOptions(max_new_tokens=max_new),
                        stream=f"c{i}",
                        draft=drafts[i],
                    )
                    fut = engine.submit([req])[0]

                    def done(
                        _f: object,
                        sent: float = sent,
                        lock: threading.Lock = lock,
                        out: list[float] = latencies,
                    ) -> None:
                        with lock:
                            out.append(time.monotonic() - sent)

                    fut.add_done_callback(done)
                    pending.append(fut)
            for f in pending:
                f.result(600)
            for i in range(n):
                engine.end_stream(f"c{i}")
            p95 = statistics.quantiles(latencies, n=20)[18]
            print(
                f"live {n:5d} streams, draft acceptance {acceptance:.0%}: update p95 {p95 * 1e3:.0f} ms",
                flush=True,
            )
            if p95 > 1.0:
                break
            best = n
        capacity[f"{acceptance:.0%}"] = best
    report["live_streams_p95_under_1s"] = capacity
    # The same for transformers (every update from scratch, one batch per hop).
    for n in (8, 32, 64):
        if left() < 30:
            report["skipped"].append(f"transformers live n={n}")
            break
        audio = [torch.randn(window_tokens, cfg.hidden_size, dtype=dtype, device=device) for _ in range(n)]
        sync(device)
        t = time.perf_counter()
        baseline.caption(audio, max_new)
        sync(device)
        took = time.perf_counter() - t
        print(f"transformers live {n} streams: one hop's updates take {took * 1e3:.0f} ms", flush=True)
        report.setdefault("transformers_hop_ms", {})[str(n)] = round(took * 1e3, 1)
    engine.close()
    report["seconds"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(report, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
