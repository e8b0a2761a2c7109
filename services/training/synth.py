"""Deterministic synthetic sound-captioning data for the tiny demo model.

Every clip is built from a small registry of acoustically distinct sound types
(tones, sweeps, coloured noise, clicks, beeps, ...) and carries exactly one
canonical caption, a deterministic function of its structured :class:`Label`.
Three caption forms exist::

    single    "A rising sweep."
    mixture   "A repeating beep over pink noise."     (foreground 6-20 dB above the noise)
    sequence  "Silence, then a falling sweep."        (two parts back to back, each >= 1 s)

Captions are compared after :func:`normalize_caption` (lowercase, every
non-alphanumeric character becomes a space, whitespace collapsed), so
"Silence, then a falling sweep." and "silence then a falling sweep" are equal.
:func:`types_in_caption` recovers the sound types a caption names.

Clip ``i`` of a dataset is drawn from ``np.random.default_rng([seed, i])``, so it
does not depend on how many clips are generated, and the same seed always gives
byte-identical audio and CSV.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf

from services.constants import DEFAULT_PROMPT, SAMPLE_RATE

MIN_SAMPLE_RATE = SAMPLE_RATE  # Hz, the highest rendered component (sweeps) reaches 7 kHz
CLIP_SECONDS = (1.0, 10.0)  # s, clip duration range (uniform)
SEQUENCE_MIN_SECONDS = 2.5  # s, shortest clip holding a two-part sequence
SEQUENCE_PART_MIN_SECONDS = 1.0  # s, shortest part of a sequence
PEAK_DBFS = (-25.0, -3.0)  # dBFS, peak level range of a clip (or of each sequence part)
MIXTURE_SNR_DB = (6.0, 20.0)  # dB, foreground RMS over background-noise RMS
SILENCE_DBFS = -80.0  # dBFS RMS of the faint noise that stands in for silence
SILENCE_ZERO_PROB = 0.1  # probability that silence is exact digital zeros
FADE_SECONDS = 0.005  # s, raised-cosine fade at the edges of every rendered part
NOISE_LOW_CUT_HZ = 20.0  # Hz, coloured-noise shaping is flat below this (keeps brown noise finite)
FORM_PROBS = {"single": 0.4, "mixture": 0.3, "sequence": 0.3}
FORMS = tuple(FORM_PROBS)
DEFAULT_USER_PROMPT = DEFAULT_PROMPT
CSV_HEADER = ("audio", "system_prompt", "user_prompt", "prediction")

RenderFn = Callable[[np.random.Generator, int, int], np.ndarray]


@dataclass(frozen=True)
class SoundType:
    """One known sound: its caption noun phrase, a coarse category and a renderer."""

    name: str
    phrase: str  # noun phrase used in captions, e.g. "a rising sweep"
    category: str  # tone | sweep | noise | impulse | pattern | silence | alarm
    render: RenderFn  # (rng, n_samples, sr) -> float64 waveform (any scale; silence: final level)

    @property
    def foreground(self) -> bool:
        """Whether the sound can sit on top of a background noise in a mixture."""
        return self.category not in ("noise", "silence")


# ----------------------------------------------------------------------------- signal helpers


def _osc(freq_hz: np.ndarray | float, n: int, sr: int, phase: float = 0.0) -> np.ndarray:
    """Sine whose instantaneous frequency is ``freq_hz`` (scalar or per-sample array)."""
    f = np.broadcast_to(np.asarray(freq_hz, dtype=np.float64), (n,))
    return np.sin(phase + 2.0 * np.pi * np.cumsum(f) / sr)


def _phase(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.0, 2.0 * np.pi))


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _fade(x: np.ndarray, sr: int, seconds: float = FADE_SECONDS) -> np.ndarray:
    k = min(int(seconds * sr), len(x) // 2)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
        x = x.copy()
        x[:k] *= ramp
        x[-k:] *= ramp[::-1]
    return x


def _peak_normalize(x: np.ndarray, peak: float = 1.0) -> np.ndarray:
    m = float(np.max(np.abs(x))) if len(x) else 0.0
    return x * (peak / m) if m > 0 else x


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def _onsets(rng: np.random.Generator, rate_hz: float, n: int, sr: int, jitter: float = 0.1) -> np.ndarray:
    """Sample indices of events at ``rate_hz`` with a random start and +-``jitter`` period jitter."""
    period = 1.0 / rate_hz
    t = np.arange(rng.uniform(0.0, period), n / sr, period)
    t = t + rng.uniform(-jitter, jitter, size=len(t)) * period
    return np.clip((t * sr).astype(np.int64), 0, max(n - 1, 0))


def _place(events: Sequence[np.ndarray], onsets: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    for ev, start in zip(events, onsets, strict=True):
        seg = ev[: n - start]
        out[start : start + len(seg)] += seg
    return out


# ----------------------------------------------------------------------------- renderers


def _tone(lo_hz: float, hi_hz: float) -> RenderFn:
    def render(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
        f = rng.uniform(lo_hz, hi_hz)
        x = _osc(f, n, sr, _phase(rng))
        if 2 * f < 0.45 * sr:  # a weak second harmonic, never aliased
            x += rng.uniform(0.0, 0.15) * _osc(2 * f, n, sr, _phase(rng))
        return x

    return render


def _sweep(rising: bool) -> RenderFn:
    def render(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
        octaves = rng.uniform(2.0, 4.0)
        f_lo = _loguniform(rng, 100.0, 7000.0 / 2**octaves)
        frac = np.arange(n) / max(n - 1, 1)
        f = f_lo * 2.0 ** (octaves * (frac if rising else 1.0 - frac))
        return _osc(f, n, sr, _phase(rng))

    return render


def colored_noise(rng: np.random.Generator, n: int, sr: int, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectral density proportional to ``f ** -exponent``."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / sr), NOISE_LOW_CUT_HZ)
    spec *= f ** (-exponent / 2.0)
    spec[0] = 0.0  # no DC
    return np.fft.irfft(spec, n)


def _clicks(lo_rate: float, hi_rate: float) -> RenderFn:
    def render(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
        onsets = _onsets(rng, rng.uniform(lo_rate, hi_rate), n, sr)
        tau = rng.uniform(0.0005, 0.0015)  # s, decay of each broadband impulse
        m = max(int(6 * tau * sr), 1)
        env = np.exp(-np.arange(m) / (tau * sr))
        events = [rng.standard_normal(m) * env * rng.uniform(0.7, 1.0) for _ in onsets]
        return _place(events, onsets, n)

    return render


def _beeps(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(800.0, 1300.0)
    onsets = _onsets(rng, rng.uniform(2.0, 5.0), n, sr, jitter=0.0)
    m = int(rng.uniform(0.06, 0.15) * sr)  # burst length; period >= 0.2 s leaves a gap
    burst = _fade(np.sin(2 * np.pi * f * (np.arange(m) / sr)), sr)
    return _place([burst] * len(onsets), onsets, n)


def _chord(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    root = rng.uniform(200.0, 450.0)
    ratios = (1.0, 2 ** (4 / 12), 2 ** (7 / 12))  # major triad: root, major third, fifth
    return sum((rng.uniform(0.7, 1.0) * _osc(root * r, n, sr, _phase(rng)) for r in ratios), np.zeros(n))


def _warble(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    center, rate, depth = rng.uniform(500.0, 1200.0), rng.uniform(5.0, 8.0), rng.uniform(0.06, 0.12)
    f = center * (1.0 + depth * np.sin(2 * np.pi * rate * (np.arange(n) / sr) + _phase(rng)))
    return _osc(f, n, sr, _phase(rng))


def _hum(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f0 = float(rng.choice([50.0, 60.0]))
    decay = rng.uniform(0.5, 1.2)
    x = np.zeros(n)
    for k in range(1, 11):  # mains hum: fundamental plus a decaying stack of harmonics
        x += rng.uniform(0.5, 1.0) / k**decay * _osc(k * f0, n, sr, _phase(rng))
    return x


def _chirps(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    onsets = _onsets(rng, rng.uniform(4.0, 8.0), n, sr)
    events = []
    for _ in onsets:
        m = int(rng.uniform(0.03, 0.07) * sr)
        f = np.linspace(rng.uniform(2000.0, 3000.0), rng.uniform(3500.0, 5000.0), m)
        events.append(np.hanning(m) * _osc(f, m, sr))
    return _place(events, onsets, n)


def _silence(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    if rng.random() < SILENCE_ZERO_PROB:
        return np.zeros(n)
    return rng.standard_normal(n) * 10 ** (SILENCE_DBFS / 20)


def _siren(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    lo, hi, period = rng.uniform(550.0, 700.0), rng.uniform(1200.0, 1450.0), rng.uniform(0.5, 1.5)
    cycle = ((np.arange(n) / sr) / period + rng.uniform()) % 1.0
    if rng.random() < 0.5:
        shape = 0.5 - 0.5 * np.cos(2 * np.pi * cycle)  # smooth wail
    else:
        shape = 1.0 - np.abs(2.0 * cycle - 1.0)  # triangular wail
    f = lo * (hi / lo) ** shape
    return _osc(f, n, sr, _phase(rng)) + 0.2 * _osc(2 * f, n, sr, _phase(rng))


SOUND_TYPES: dict[str, SoundType] = {
    s.name: s
    for s in (
        SoundType("low_tone", "a steady low tone", "tone", _tone(100.0, 250.0)),
        SoundType("mid_tone", "a steady mid tone", "tone", _tone(400.0, 900.0)),
        SoundType("high_tone", "a steady high tone", "tone", _tone(1800.0, 3500.0)),
        SoundType("rising_sweep", "a rising sweep", "sweep", _sweep(rising=True)),
        SoundType("falling_sweep", "a falling sweep", "sweep", _sweep(rising=False)),
        SoundType("white_noise", "white noise", "noise", partial(colored_noise, exponent=0.0)),
        SoundType("pink_noise", "pink noise", "noise", partial(colored_noise, exponent=1.0)),
        SoundType("brown_noise", "brown noise", "noise", partial(colored_noise, exponent=2.0)),
        SoundType("slow_clicks", "slow clicks", "impulse", _clicks(2.0, 4.0)),
        SoundType("fast_clicks", "fast clicks", "impulse", _clicks(12.0, 20.0)),
        SoundType("beeps", "a repeating beep", "pattern", _beeps),
        SoundType("chord", "a major chord", "tone", _chord),
        SoundType("warble", "a warbling tone", "tone", _warble),
        SoundType("hum", "a low hum", "tone", _hum),
        SoundType("chirps", "bird-like chirps", "pattern", _chirps),
        SoundType("silence", "silence", "silence", _silence),
        SoundType("siren", "a wailing siren", "alarm", _siren),
    )
}
EXTRA_TYPES: tuple[str, ...] = ("siren",)
DEFAULT_TYPES: tuple[str, ...] = tuple(t for t in SOUND_TYPES if t not in EXTRA_TYPES)


# ----------------------------------------------------------------------------- labels and captions


@dataclass(frozen=True)
class Label:
    """Structured description of a clip: single (a,), mixture (foreground, noise), sequence (first, second)."""

    form: str
    types: tuple[str, ...]

    def __post_init__(self) -> None:
        n_parts = 1 if self.form == "single" else 2
        ok = self.form in FORMS and len(self.types) == n_parts and all(t in SOUND_TYPES for t in self.types)
        if ok and self.form == "mixture":
            ok = SOUND_TYPES[self.types[0]].foreground and SOUND_TYPES[self.types[1]].category == "noise"
        if ok and self.form == "sequence":
            ok = self.types[0] != self.types[1]
        if not ok:
            raise ValueError(
                f"invalid label {self.form} {self.types}: need single (sound,), "
                "mixture (foreground, noise) or sequence (a, b) with a != b"
            )


def caption_for(label: Label) -> str:
    """The one canonical caption sentence of ``label``."""
    phrases = [SOUND_TYPES[t].phrase for t in label.types]
    body = {"single": "{}", "mixture": "{} over {}", "sequence": "{}, then {}"}[label.form]
    text = body.format(*phrases)
    return text[0].upper() + text[1:] + "."


def normalize_caption(text: str) -> str:
    """Lowercase, turn every non-alphanumeric character into a space, collapse whitespace."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _core_phrase(phrase: str) -> str:
    """Normalized phrase without its leading article ("a rising sweep" -> "rising sweep")."""
    return re.sub(r"^(a|an|the) ", "", normalize_caption(phrase))


_CORE_TO_TYPE = {_core_phrase(s.phrase): name for name, s in SOUND_TYPES.items()}
_PHRASE_RE = re.compile(
    r"\b(" + "|".join(re.escape(p) for p in sorted(_CORE_TO_TYPE, key=len, reverse=True)) + r")\b"
)


def types_in_caption(caption: str) -> list[str]:
    """Sound types a caption names, in order of appearance (longest phrase wins)."""
    return [_CORE_TO_TYPE[m.group(1)] for m in _PHRASE_RE.finditer(normalize_caption(caption))]


def label_from_caption(caption: str) -> Label | None:
    """Parse a caption back into its :class:`Label`; ``None`` if it is not a canonical caption."""
    types = tuple(types_in_caption(caption))
    target = normalize_caption(caption)
    for form in FORMS:
        try:
            label = Label(form, types)
        except ValueError:
            continue
        if normalize_caption(caption_for(label)) == target:
            return label
    return None


def all_captions(types: Sequence[str] | None = None) -> list[str]:
    """Every caption the generator can produce for ``types`` (sorted)."""
    names = resolve_types(types)
    fg = [t for t in names if SOUND_TYPES[t].foreground]
    bg = [t for t in names if SOUND_TYPES[t].category == "noise"]
    labels = [Label("single", (t,)) for t in names]
    labels += [Label("mixture", (f, b)) for f in fg for b in bg]
    labels += [Label("sequence", (a, b)) for a in names for b in names if a != b]
    return sorted(caption_for(lab) for lab in labels)


# ----------------------------------------------------------------------------- clips


@dataclass
class Clip:
    samples: np.ndarray  # float32 mono in [-1, 1]
    caption: str
    label: Label
    sr: int = SAMPLE_RATE

    @property
    def types(self) -> list[str]:
        return list(self.label.types)

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sr


def resolve_types(types: Sequence[str] | None) -> tuple[str, ...]:
    """Validate ``types`` (``None`` -> :data:`DEFAULT_TYPES`), drop duplicates, keep order."""
    if types is None:
        return DEFAULT_TYPES
    names = tuple(dict.fromkeys(types))
    unknown = [t for t in names if t not in SOUND_TYPES]
    if unknown or not names:
        raise ValueError(f"unknown or empty sound types {unknown}; known: {', '.join(SOUND_TYPES)}")
    return names


def render_sound(name: str, rng: np.random.Generator, n: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One sound at a random peak level in :data:`PEAK_DBFS` (silence stays near zero)."""
    spec = SOUND_TYPES[name]
    x = spec.render(rng, n, sr)
    if spec.category == "silence":
        return x
    return _peak_normalize(_fade(x, sr), 10 ** (rng.uniform(*PEAK_DBFS) / 20))


def _render(label: Label, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    if label.form == "single":
        return render_sound(label.types[0], rng, n, sr)
    if label.form == "mixture":
        fg = render_sound(label.types[0], rng, n, sr)
        bg = render_sound(label.types[1], rng, n, sr)
        snr_db = rng.uniform(*MIXTURE_SNR_DB)
        mix = fg + bg * (_rms(fg) / max(_rms(bg), 1e-12)) * 10 ** (-snr_db / 20)
        return _peak_normalize(mix, 10 ** (rng.uniform(*PEAK_DBFS) / 20))
    part = int(SEQUENCE_PART_MIN_SECONDS * sr)
    split = int(rng.integers(part, n - part + 1))
    return np.concatenate(
        [render_sound(label.types[0], rng, split, sr), render_sound(label.types[1], rng, n - split, sr)]
    )


def make_clip(rng: np.random.Generator, types: Sequence[str] | None = None, sr: int = SAMPLE_RATE) -> Clip:
    """Draw one random clip whose sounds all come from ``types`` (default :data:`DEFAULT_TYPES`).

    A mixture needs a foreground type and a noise type in ``types``, a sequence two
    types; infeasible forms are dropped and the remaining probabilities renormalized.
    """
    if sr < MIN_SAMPLE_RATE:
        raise ValueError(f"sample rate must be >= {MIN_SAMPLE_RATE} Hz, got {sr}")
    names = resolve_types(types)
    fg = [t for t in names if SOUND_TYPES[t].foreground]
    bg = [t for t in names if SOUND_TYPES[t].category == "noise"]
    feasible = {"single": True, "mixture": bool(fg and bg), "sequence": len(names) >= 2}
    forms = [f for f in FORMS if feasible[f]]
    probs = np.array([FORM_PROBS[f] for f in forms])
    form = forms[int(rng.choice(len(forms), p=probs / probs.sum()))]

    if form == "single":
        label = Label(form, (str(rng.choice(names)),))
    elif form == "mixture":
        label = Label(form, (str(rng.choice(fg)), str(rng.choice(bg))))
    else:
        first, second = rng.choice(len(names), size=2, replace=False)
        label = Label(form, (names[int(first)], names[int(second)]))

    lo = SEQUENCE_MIN_SECONDS if form == "sequence" else CLIP_SECONDS[0]
    n = int(round(rng.uniform(lo, CLIP_SECONDS[1]) * sr))
    x = np.clip(_render(label, rng, n, sr), -1.0, 1.0).astype(np.float32)
    return Clip(samples=x, caption=caption_for(label), label=label, sr=sr)


# ----------------------------------------------------------------------------- dataset


def generate_dataset(
    out_dir: str | Path,
    n_clips: int,
    seed: int,
    types: Sequence[str] | None = None,
    user_prompt: str = DEFAULT_USER_PROMPT,
    system_prompt: str = "",
    progress: bool = True,
) -> Path:
    """Write ``out_dir/audio/NNNNNN.wav`` (16-bit PCM mono) and ``out_dir/data.csv``; return the CSV path.

    The CSV uses the mdl-toolkit layout (``audio,system_prompt,user_prompt,prediction``)
    with audio paths relative to the CSV's directory. Clip ``i`` comes from
    ``np.random.default_rng([seed, i])``.
    """
    from tqdm import tqdm

    names = resolve_types(types)
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(max(n_clips - 1, 0))))
    csv_path = out / "data.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for i in tqdm(range(n_clips), desc="synth", unit="clip", disable=not progress):
            clip = make_clip(np.random.default_rng([seed, i]), names)
            rel = f"audio/{i:0{width}d}.wav"
            sf.write(out / rel, clip.samples, clip.sr, subtype="PCM_16", format="WAV")
            writer.writerow([rel, system_prompt, user_prompt, clip.caption])
    return csv_path


# ----------------------------------------------------------------------------- CLI


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output directory (gets audio/ and data.csv)")
    p.add_argument("--n", type=int, default=2000, help="number of clips (default: 2000)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed -> identical data (default: 0)"
    )
    p.add_argument(
        "--types",
        default=None,
        help=f"comma-separated sound types (default: all but {', '.join(EXTRA_TYPES)}); "
        f"known: {', '.join(SOUND_TYPES)}",
    )
    p.add_argument(
        "--include-extra",
        action="store_true",
        help=f"also use the extra types held out of the default set ({', '.join(EXTRA_TYPES)})",
    )
    p.add_argument("--user-prompt", default=DEFAULT_USER_PROMPT, help="user prompt written to every row")
    p.add_argument("--system-prompt", default="", help="system prompt written to every row")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_synth(args: argparse.Namespace) -> int:
    """Handle parsed ``synth`` arguments; return an exit code."""
    types = (
        list(DEFAULT_TYPES) if args.types is None else [t.strip() for t in args.types.split(",") if t.strip()]
    )
    if args.include_extra:
        types += [t for t in EXTRA_TYPES if t not in types]
    try:
        types = list(resolve_types(types))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    csv_path = generate_dataset(
        args.out, args.n, args.seed, types, args.user_prompt, args.system_prompt, progress=not args.quiet
    )
    print(f"wrote {args.n} clips to {csv_path}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synth`` on an argparse subparsers object (handler in ``func``)."""
    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic sound-captioning dataset",
        description="Generate deterministic synthetic audio clips with canonical captions "
        "(mdl-toolkit CSV layout) for training the demo model.",
    )
    _add_arguments(p)
    p.set_defaults(func=run_synth)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.training.synth", description="Generate a synthetic sound-captioning dataset."
    )
    _add_arguments(parser)
    return run_synth(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
