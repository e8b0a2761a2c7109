"""``midasheng caption FILE...``: offline captions for audio files, optionally in timed segments."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from lm_service.engines import DEFAULT_ENGINE, ENGINES
from lm_service.engines.limits import EngineLimits
from lm_service.offline import DEFAULT_SEGMENT_SECONDS, LONG_AUDIO_SECONDS, Captioner
from services import config
from services.audio.io import decode_audio
from services.audio.subtitles import FORMATS, TimedCaption, render
from services.constants import DEFAULT_PROMPT, SAMPLE_RATE
from services.errors import AudioDecodeError
from services.model.generation import GenerationOptions

SUFFIX = {"text": ".txt", "jsonl": ".jsonl", "srt": ".srt", "vtt": ".vtt"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint directory or hub id (default: the bundled demo model)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: bfloat16 on GPU, float32 on CPU); the frontend stays fp32",
    )


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"question asked about the audio (default: {DEFAULT_PROMPT!r})",
    )
    p.add_argument("--system-prompt", default=None, help="optional system turn")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="caption length limit in tokens (default: 64)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    opts = GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    opts.validate()
    return opts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="caption audio files",
        description="Caption audio files (wav, flac, ogg, mp3, ...; any rate, mono or stereo). Files longer "
        f"than {LONG_AUDIO_SECONDS:.0f} s are captioned in consecutive segments with timestamps.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default: 8)")
    p.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        choices=ENGINES,
        help=f"caption engine (default: {DEFAULT_ENGINE})",
    )
    config.add_flags(p, EngineLimits)
    p.add_argument("--json", action="store_true", help="JSON lines output (same as --format jsonl)")
    p.add_argument(
        "--segment",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"caption consecutive segments of this length (default: {DEFAULT_SEGMENT_SECONDS:.0f} s "
        f"for files longer than {LONG_AUDIO_SECONDS:.0f} s, else whole files); 0 disables",
    )
    p.add_argument("--format", choices=FORMATS, default=None, help="output format (default: text)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="write one output file per input here instead of printing (needed for srt/vtt with several files)",
    )
    p.set_defaults(func=run)


def _segment_length(args: argparse.Namespace, seconds: float) -> float | None:
    if args.segment is not None:
        return args.segment if args.segment > 0 else None
    return DEFAULT_SEGMENT_SECONDS if seconds > LONG_AUDIO_SECONDS else None


def run(args: argparse.Namespace) -> int:
    fmt = "jsonl" if args.json else (args.format or "text")
    if fmt in ("srt", "vtt") and len(args.files) > 1 and args.output_dir is None:
        print(
            "midasheng caption: error: --format srt/vtt with several files needs --output-dir",
            file=sys.stderr,
        )
        return 2
    if args.batch_size < 1:
        print("midasheng caption: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    options = generation_options(args)
    captioner = Captioner.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        engine=args.engine,
        max_batch=args.batch_size,
        limits=config.from_args(EngineLimits, args),
    )
    try:
        if args.output_dir is not None:
            args.output_dir.mkdir(parents=True, exist_ok=True)

        failures = 0
        progress = tqdm(
            args.files, desc="captioning", unit="file", disable=len(args.files) < 2 or None, file=sys.stderr
        )
        for path in progress:
            try:
                audio = decode_audio(path)
            except AudioDecodeError as e:
                failures += 1
                print(f"midasheng caption: error: {e}", file=sys.stderr)
                continue
            seconds = len(audio) / SAMPLE_RATE
            seg = _segment_length(args, seconds)
            if seg is None:
                text = captioner.caption([audio], args.prompt, args.system_prompt, options)[0]
                captions = [TimedCaption(0.0, seconds, text)]
            else:
                captions = captioner.caption_segments(audio, seg, args.prompt, args.system_prompt, options)
            _emit(path, captions, fmt, args, whole=seg is None, single=len(args.files) == 1)
    finally:
        captioner.close()
    return 1 if failures else 0


def _emit(
    path: Path, captions: list[TimedCaption], fmt: str, args: argparse.Namespace, whole: bool, single: bool
) -> None:
    if fmt == "jsonl":
        text = "".join(
            json.dumps(
                {"file": str(path), "start": round(c.start, 3), "end": round(c.end, 3), "caption": c.text}
            )
            + "\n"
            for c in captions
        )
    elif fmt == "text" and whole:
        text = (captions[0].text if single or args.output_dir else f"{path}: {captions[0].text}") + "\n"
    elif fmt == "text" and not single and args.output_dir is None:
        text = f"# {path}\n" + render(captions, fmt)
    else:
        text = render(captions, fmt)
    if args.output_dir is not None:
        (args.output_dir / (path.stem + SUFFIX[fmt])).write_text(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
