"""End to end: ``midasheng caption`` on a tiny checkpoint written by the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from services.audio.subtitles import parse_srt, parse_webvtt
from services.model.checkpoint import build_model, save_model
from services.model.config import tiny_config
from services.training.tokenizer import train_caption_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_caption_tokenizer(
        ["A steady low tone.", "Pink noise, then silence."], ["Caption the audio."], 300
    )
    cfg = tiny_config(vocab_size=len(tok), audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    # A random model: --max-new-tokens bounds its output.
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", tok)


def encode_stereo(path: Path, codec: str, seconds: float = 3.0, rate: int = 44100) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        if codec == "vorbis":
            stream.options = {"strict": "experimental"}
        frame_len = 1152
        for i in range(0, len(tone), frame_len):
            chunk = np.stack([tone[i : i + frame_len]] * 2)  # planar (channels, samples)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="stereo")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services", "caption", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_caption_files_with_one_unreadable(tiny_ckpt: Path, tmp_path: Path) -> None:
    mp3 = encode_stereo(tmp_path / "tone.mp3", "mp3")
    ogg = encode_stereo(tmp_path / "tone.ogg", "vorbis")
    wav = tmp_path / "short.wav"
    sf.write(wav, np.zeros(8000, dtype=np.float32), 16000, subtype="PCM_16")
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    res = run_cli(
        str(mp3),
        str(bad),
        str(ogg),
        str(wav),
        "--model",
        str(tiny_ckpt),
        "--json",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
    )
    assert res.returncode != 0
    assert "broken.wav" in res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [Path(r["file"]).name for r in lines] == ["tone.mp3", "tone.ogg", "short.wav"]
    for r in lines:
        assert isinstance(r["caption"], str) and r["caption"]
    assert lines[0]["end"] == pytest.approx(3.0, abs=0.1)  # 44.1 kHz stereo decoded to its real duration
    assert lines[2]["end"] == pytest.approx(0.5, abs=0.01)


def test_caption_single_file_plain_text(tiny_ckpt: Path, tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32), 16000)
    res = run_cli(str(wav), "--model", str(tiny_ckpt), "--max-new-tokens", "4", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt,parse", [("srt", parse_srt), ("vtt", parse_webvtt)])
def test_long_file_segments(tiny_ckpt: Path, tmp_path: Path, fmt: str, parse) -> None:  # type: ignore[no-untyped-def]
    wav = tmp_path / "long.wav"
    sf.write(wav, (0.05 * np.random.default_rng(1).standard_normal(95 * 16000)).astype(np.float32), 16000)
    res = run_cli(
        str(wav), "--model", str(tiny_ckpt), "--format", fmt, "--max-new-tokens", "3", "--device", "cpu"
    )
    assert res.returncode == 0, res.stderr
    cues = parse(res.stdout)
    assert len(cues) == 10  # default 10 s segments for files over 30 s: 9 x 10 s + 5 s
    assert cues[0].start == 0.0
    assert cues[-1].end == pytest.approx(95.0, abs=1e-3)
    for a, b in zip(cues, cues[1:], strict=False):
        assert a.end == pytest.approx(b.start, abs=1e-3)  # contiguous, monotonic
        assert a.start < a.end


def test_srt_for_many_files_needs_output_dir(tiny_ckpt: Path, tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    res = run_cli(str(wav), str(wav), "--model", str(tiny_ckpt), "--format", "srt")
    assert res.returncode == 2
    assert "--output-dir" in res.stderr
    out_dir = tmp_path / "subs"
    res = run_cli(
        str(wav),
        "--model",
        str(tiny_ckpt),
        "--format",
        "srt",
        "--segment",
        "0.5",
        "--output-dir",
        str(out_dir),
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    assert len(parse_srt((out_dir / "a.srt").read_text())) == 2


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    res = run_cli(str(wav), "--model", str(tmp_path / "nope"))
    assert res.returncode == 2
    assert "does not exist" in res.stderr
