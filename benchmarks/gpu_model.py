"""Real-size MiDashengLM-7B on one GPU with random bf16 weights: memory and latency.

Reports peak GPU memory, encoder milliseconds for 30 s of audio, and prefill + first-token
milliseconds for that clip's prompt. Baseline in the same run: the same decoder prefill with
25 Hz audio tokens (no 5x projector stacking, as audio LLMs with 25 Hz tokens do), so the
ratio shows what the 5 Hz tokens save on this card.

    python benchmarks/gpu_model.py                # needs CUDA
    python benchmarks/gpu_model.py --tiny --device cpu   # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.constants import SAMPLE_RATE
from services.model.checkpoint import random_model  # noqa: E402
from services.model.config import real_7b_config, tiny_config  # noqa: E402
from services.model.modeling import CACHE_KW  # noqa: E402


def timed(fn, device: torch.device, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny config (script smoke test)")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; run on a GPU machine or pass --tiny --device cpu.", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = tiny_config() if args.tiny else real_7b_config()
    torch.manual_seed(0)
    model = random_model(cfg, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    n = int(args.seconds * SAMPLE_RATE)
    audio = torch.randn(1, n, device=device) * 0.1
    lengths = torch.tensor([n], device=device)
    n_tok = model.token_count(n)
    text_len = 40  # ChatML prompt around the audio

    @torch.inference_mode()
    def encode() -> None:
        model.encode_audio(audio, lengths)

    def prefill_fn(audio_tokens: int):  # type: ignore[no-untyped-def]
        embeds = torch.randn(1, audio_tokens + text_len, cfg.hidden_size, device=device, dtype=dtype)
        mask = torch.ones(1, audio_tokens + text_len, dtype=torch.long, device=device)

        @torch.inference_mode()
        def run() -> None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.decoder.config)
            out = model.decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                **{CACHE_KW: cache},
            )
            out.logits[:, -1].argmax(-1).item()  # first token on the host

        return run

    for fn in (encode, prefill_fn(n_tok)):
        fn()  # warm-up
    enc_ms = timed(encode, device, args.repeat)
    pre5 = timed(prefill_fn(n_tok), device, args.repeat)
    pre25 = timed(prefill_fn(n_tok * 5), device, args.repeat)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "command": " ".join(sys.argv),
        "card": card,
        "config": "tiny" if args.tiny else "midashenglm-7b (random bf16 weights)",
        "audio_seconds": args.seconds,
        "audio_tokens_5hz": n_tok,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "encoder_ms_median": round(statistics.median(enc_ms), 2),
        "prefill_first_token_ms_median_5hz": round(statistics.median(pre5), 2),
        "baseline_prefill_first_token_ms_median_25hz": round(statistics.median(pre25), 2),
        "ratio_25hz_over_5hz": round(statistics.median(pre25) / statistics.median(pre5), 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
