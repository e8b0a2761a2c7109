"""Tests for the deterministic synthetic captioning data generator."""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services.training import synth
from services.training.synth import (
    DEFAULT_TYPES,
    EXTRA_TYPES,
    SAMPLE_RATE,
    SOUND_TYPES,
    Label,
    all_captions,
    caption_for,
    generate_dataset,
    label_from_caption,
    make_clip,
    normalize_caption,
    render_sound,
    types_in_caption,
)

SR = SAMPLE_RATE


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([12345, *key])


def _dominant_hz(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1.0 / sr)[int(np.argmax(spec))])


def _frame_track(x: np.ndarray, frame: int = 512, hop: int = 160) -> np.ndarray:
    starts = range(0, len(x) - frame, hop)
    return np.array([_dominant_hz(x[s : s + frame]) for s in starts])


def _dbfs_rms(x: np.ndarray) -> float:
    return 20 * np.log10(max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-20))


# ----------------------------------------------------------------------------- registry and captions


def test_registry_sizes_and_extra_types() -> None:
    assert len(DEFAULT_TYPES) >= 16
    assert EXTRA_TYPES == ("siren",)
    assert "siren" not in DEFAULT_TYPES and "siren" in SOUND_TYPES
    assert set(DEFAULT_TYPES) | set(EXTRA_TYPES) == set(SOUND_TYPES)
    assert len({s.phrase for s in SOUND_TYPES.values()}) == len(SOUND_TYPES)


def test_default_clips_exclude_siren_and_include_it_when_asked() -> None:
    default = {t for i in range(300) for t in make_clip(_rng(1, i)).types}
    assert "siren" not in default
    assert default == set(DEFAULT_TYPES)
    only_siren = [make_clip(_rng(2, i), types=["siren"]) for i in range(5)]
    assert all(c.caption == "A wailing siren." for c in only_siren)
    extra = {t for i in range(200) for t in make_clip(_rng(3, i), types=[*DEFAULT_TYPES, "siren"]).types}
    assert "siren" in extra
    with pytest.raises(ValueError):
        make_clip(_rng(4), types=["no_such_sound"])


def test_core_phrases_do_not_overlap() -> None:
    cores = [synth._core_phrase(s.phrase) for s in SOUND_TYPES.values()]
    for a in cores:
        for b in cores:
            assert a == b or f" {a} " not in f" {b} ", (a, b)


def test_caption_forms_and_normalization() -> None:
    assert caption_for(Label("single", ("rising_sweep",))) == "A rising sweep."
    assert caption_for(Label("mixture", ("beeps", "pink_noise"))) == "A repeating beep over pink noise."
    assert caption_for(Label("sequence", ("silence", "falling_sweep"))) == "Silence, then a falling sweep."
    assert normalize_caption("  Silence, then a FALLING sweep. ") == "silence then a falling sweep"
    assert normalize_caption("Bird-like chirps.") == "bird like chirps"
    assert types_in_caption("pink noise") == ["pink_noise"]
    assert types_in_caption("the wailing siren over brown noise") == ["siren", "brown_noise"]
    assert types_in_caption("some noise") == []
    for bad in [("mixture", ("white_noise", "pink_noise")), ("sequence", ("hum", "hum")), ("single", ("x",))]:
        with pytest.raises(ValueError):
            Label(*bad)


def test_every_possible_caption_round_trips() -> None:
    caps = all_captions([*DEFAULT_TYPES, *EXTRA_TYPES])
    assert len(caps) == len(set(caps))
    assert len(all_captions()) < len(caps)
    for cap in caps:
        label = label_from_caption(cap)
        assert label is not None and caption_for(label) == cap
        assert types_in_caption(cap) == list(label.types)
    assert label_from_caption("A low hum over silence.") is None


# ----------------------------------------------------------------------------- sampled clips


@pytest.fixture(scope="module")
def clips() -> list[synth.Clip]:
    return [make_clip(np.random.default_rng([7, i])) for i in range(500)]


def test_sampled_clips_are_well_formed(clips: list[synth.Clip]) -> None:
    allowed = set(all_captions())
    for c in clips:
        assert types_in_caption(c.caption) == c.types
        assert label_from_caption(c.caption) == c.label
        assert c.caption in allowed
        assert c.samples.dtype == np.float32 and c.samples.ndim == 1
        assert np.all(np.isfinite(c.samples))
        assert np.max(np.abs(c.samples)) <= 1.0
        lo = synth.SEQUENCE_MIN_SECONDS if c.label.form == "sequence" else 1.0
        assert lo - 1e-3 <= c.duration <= 10.0 + 1e-3


def test_form_proportions(clips: list[synth.Clip]) -> None:
    counts = Counter(c.label.form for c in clips)
    for form, p in synth.FORM_PROBS.items():
        assert abs(counts[form] / len(clips) - p) < 0.08, counts


def test_levels(clips: list[synth.Clip]) -> None:
    for c in clips:
        peak = float(np.max(np.abs(c.samples)))
        if c.label.form == "single" and c.types == ["silence"]:
            assert _dbfs_rms(c.samples) < -60
        elif "silence" not in c.types:
            assert -25.5 <= 20 * np.log10(peak) <= -2.9


# ----------------------------------------------------------------------------- acoustics


@pytest.mark.parametrize(
    ("name", "lo", "hi"), [("low_tone", 100, 250), ("mid_tone", 400, 900), ("high_tone", 1800, 3500)]
)
def test_tone_bands(name: str, lo: float, hi: float) -> None:
    for i in range(10):
        f = _dominant_hz(render_sound(name, _rng(10, i), SR))
        assert lo - 5 <= f <= hi + 5, (name, f)


@pytest.mark.parametrize("name", ["rising_sweep", "falling_sweep"])
def test_sweep_direction(name: str) -> None:
    for i in range(10):
        x = render_sound(name, _rng(11, i), 3 * SR)
        q = len(x) // 4
        first, last = _dominant_hz(x[:q]), _dominant_hz(x[-q:])
        assert (last > 2 * first) if name == "rising_sweep" else (first > 2 * last), (first, last)


def _noise_slope(x: np.ndarray, seg: int = 4096) -> float:
    frames = x[: len(x) // seg * seg].reshape(-1, seg) * np.hanning(seg)
    power = np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)
    f = np.fft.rfftfreq(seg, 1.0 / SR)
    band = (f >= 100) & (f <= 6000)
    return float(np.polyfit(np.log10(f[band]), np.log10(power[band]), 1)[0])


def test_noise_spectral_slopes() -> None:
    slopes = {
        n: _noise_slope(render_sound(n, _rng(12), 10 * SR))
        for n in ("white_noise", "pink_noise", "brown_noise")
    }
    assert slopes["white_noise"] > slopes["pink_noise"] > slopes["brown_noise"]
    for name, expected in (("white_noise", 0.0), ("pink_noise", -1.0), ("brown_noise", -2.0)):
        assert abs(slopes[name] - expected) < 0.3, slopes


def _onsets_per_second(x: np.ndarray, frame: int = 80) -> float:
    energy = np.square(x[: len(x) // frame * frame].reshape(-1, frame)).sum(axis=1)
    active = energy > 0.05 * energy.max()
    return int(np.sum(active[1:] & ~active[:-1]) + active[0]) / (len(x) / SR)


def test_click_rates() -> None:
    for i in range(5):
        slow = _onsets_per_second(render_sound("slow_clicks", _rng(13, i), 5 * SR))
        fast = _onsets_per_second(render_sound("fast_clicks", _rng(14, i), 5 * SR))
        assert 1.4 <= slow <= 4.6 and 10 <= fast <= 21 and fast > 2 * slow, (slow, fast)


def test_beeps_have_gaps_and_pitch() -> None:
    x = render_sound("beeps", _rng(15), 4 * SR)
    assert 1.5 <= _onsets_per_second(x) <= 5.5
    assert 700 <= _dominant_hz(x) <= 1400
    frames = np.square(x[: len(x) // 160 * 160].reshape(-1, 160)).sum(axis=1)
    assert np.mean(frames < 1e-3 * frames.max()) > 0.2


def test_silence_is_quiet() -> None:
    for i in range(20):
        assert _dbfs_rms(render_sound("silence", _rng(16, i), SR)) < -60


def test_siren_pitch_goes_up_and_down() -> None:
    for i in range(5):
        track = _frame_track(render_sound("siren", _rng(17, i), 3 * SR))
        assert track.min() < 800 and track.max() > 1100, (track.min(), track.max())
        smooth = np.convolve(track, np.ones(5) / 5, mode="valid")
        d = np.diff(smooth)
        assert np.sum(d > 5) > 10 and np.sum(d < -5) > 10


def test_warble_pitch_wobbles_fast() -> None:
    track = _frame_track(render_sound("warble", _rng(18), 2 * SR))
    assert track.max() - track.min() > 60
    sign_changes = np.sum(np.diff(np.sign(track - np.median(track))) != 0)
    assert sign_changes / 2 >= 2 * 4  # >= ~4 vibrato cycles per second over 2 s


# ----------------------------------------------------------------------------- dataset files


def _rows(csv_path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(csv_path.read_text(), newline="")))


def _read(csv_path: Path) -> tuple[str, dict[str, bytes]]:
    rows = _rows(csv_path)
    return csv_path.read_text(), {r["audio"]: (csv_path.parent / r["audio"]).read_bytes() for r in rows}


def test_dataset_layout(tmp_path: Path) -> None:
    path = generate_dataset(
        tmp_path / "d", 5, seed=3, user_prompt="Describe.", system_prompt="sys", progress=True
    )
    assert path == tmp_path / "d" / "data.csv"
    rows = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    assert rows[0] == ["audio", "system_prompt", "user_prompt", "prediction"]
    assert len(rows) == 6
    for audio, system, user, prediction in rows[1:]:
        assert not Path(audio).is_absolute() and audio.startswith("audio/")
        data, sr = sf.read(path.parent / audio, dtype="float32")
        info = sf.info(path.parent / audio)
        assert sr == SR and data.ndim == 1 and info.subtype == "PCM_16"
        assert (system, user) == ("sys", "Describe.")
        assert label_from_caption(prediction) is not None


def test_dataset_is_deterministic(tmp_path: Path) -> None:
    a = _read(generate_dataset(tmp_path / "a", 6, seed=1, progress=False))
    b = _read(generate_dataset(tmp_path / "b", 6, seed=1, progress=False))
    c = _read(generate_dataset(tmp_path / "c", 6, seed=2, progress=False))
    short = _read(generate_dataset(tmp_path / "s", 3, seed=1, progress=False))
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert all(a[1][k] == v for k, v in short[1].items())  # clip i does not depend on n_clips


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="midasheng")
    synth.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["synth", "--out", str(tmp_path / "x"), "--n", "4", "--types", "siren,hum", "--quiet"]
    )
    assert args.func(args) == 0
    captions = [r["prediction"] for r in _rows(tmp_path / "x" / "data.csv")]
    assert {t for cap in captions for t in types_in_caption(cap)} <= {"siren", "hum"}
    assert synth.main(["--out", str(tmp_path / "y"), "--n", "2", "--include-extra", "--quiet"]) == 0
    assert "wrote 2 clips" in capsys.readouterr().out
