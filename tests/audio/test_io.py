"""Tests for services.audio.io: decoding real encoded files, error reporting and PCM helpers."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from services.audio.io import (
    SAMPLE_RATE,
    decode_audio,
    float_to_pcm16_bytes,
    load_wav_pcm16,
    pcm16_bytes_to_float,
    write_wav,
)
from services.errors import AudioDecodeError, InvalidArgument

TONE_HZ = 440.0
DURATION_S = 2.0


def _tone(rate: int, channels: int, seconds: float = DURATION_S, amplitude: float = 0.5) -> np.ndarray:
    """(channels, samples) float32 sine at TONE_HZ, the same on every channel."""
    t = np.arange(int(round(rate * seconds))) / rate
    mono = (amplitude * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    return np.tile(mono, (channels, 1))


def _encode(path: Path, codec: str, rate: int, channels: int, options: dict[str, str] | None = None) -> None:
    """Encode a TONE_HZ sine with PyAV; the container is picked from the file suffix."""
    layout = "stereo" if channels == 2 else "mono"
    data = _tone(rate, channels)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        if options:
            stream.codec_context.options = options
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        # PyAV re-chunks the frame into the encoder's frame_size internally.
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    """Frequency of the largest FFT bin of a Hann-windowed signal."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def _check_tone(samples: np.ndarray) -> None:
    assert samples.dtype == np.float32
    assert samples.ndim == 1  # mono
    assert abs(len(samples) / SAMPLE_RATE - DURATION_S) <= 0.05
    assert abs(_dominant_hz(samples, SAMPLE_RATE) - TONE_HZ) <= 5.0
    assert np.abs(samples).max() <= 1.0
    # Identical channels down-mix to their average, not to a 3 dB louder sum.
    rms = float(np.sqrt(np.mean(samples[SAMPLE_RATE // 4 : -SAMPLE_RATE // 4] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


@pytest.mark.parametrize(
    ("suffix", "codec", "options"),
    [
        ("mp3", "libmp3lame", None),
        # FFmpeg's native Vorbis encoder is flagged experimental (no libvorbis in the wheel).
        ("ogg", "vorbis", {"strict": "experimental"}),
    ],
)
def test_decode_lossy_44k_stereo(
    tmp_path: Path, suffix: str, codec: str, options: dict[str, str] | None
) -> None:
    path = tmp_path / f"tone.{suffix}"
    _encode(path, codec, 44100, 2, options)
    _check_tone(decode_audio(path))


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
@pytest.mark.parametrize(("suffix", "codec"), [("flac", "flac"), ("wav", "pcm_s16le")])
def test_decode_lossless_any_rate(tmp_path: Path, suffix: str, codec: str, rate: int) -> None:
    path = tmp_path / f"tone_{rate}.{suffix}"
    _encode(path, codec, rate, 2)
    samples = decode_audio(str(path))
    _check_tone(samples)
    # Lossless sources must survive resampling almost exactly: compare to an ideal 16 kHz tone.
    expected = _tone(SAMPLE_RATE, 1)[0]
    n = min(len(samples), len(expected))
    middle = slice(SAMPLE_RATE // 10, n - SAMPLE_RATE // 10)  # skip filter edge effects
    assert np.max(np.abs(samples[middle] - expected[middle])) < 0.01


def test_decode_opus_48k_mono(tmp_path: Path) -> None:
    path = tmp_path / "tone.opus"
    data = _tone(48000, 1)[0]
    with av.open(str(path), mode="w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(data[None, :], format="fltp", layout="mono")
        frame.sample_rate = 48000
        frame.pts = 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    samples = decode_audio(path)
    assert abs(len(samples) / SAMPLE_RATE - DURATION_S) <= 0.05
    assert abs(_dominant_hz(samples, SAMPLE_RATE) - TONE_HZ) <= 5.0


@pytest.mark.parametrize("suffix", ["mp3", "flac", "wav"])
def test_decode_from_bytes_matches_path(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tone.{suffix}"
    codec = {"mp3": "libmp3lame", "flac": "flac", "wav": "pcm_s16le"}[suffix]
    _encode(path, codec, 44100, 2)
    from_bytes = decode_audio(path.read_bytes())
    _check_tone(from_bytes)
    np.testing.assert_array_equal(from_bytes, decode_audio(path))


def test_decode_other_sample_rate(tmp_path: Path) -> None:
    path = tmp_path / "tone.flac"
    _encode(path, "flac", 44100, 1)
    samples = decode_audio(path, sample_rate=8000)
    assert abs(len(samples) / 8000 - DURATION_S) <= 0.05
    assert abs(_dominant_hz(samples, 8000) - TONE_HZ) <= 5.0
    with pytest.raises(ValueError, match="sample_rate"):
        decode_audio(path, sample_rate=0)


def test_full_scale_stereo_does_not_clip(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    sf.write(str(path), _tone(16000, 2, amplitude=1.0).T, 16000, subtype="FLOAT")
    samples = decode_audio(path)
    assert np.abs(samples).max() <= 1.0
    # Not clipped: the peak stays a sine peak, it does not flatten into a run of 1.0s.
    assert np.count_nonzero(np.abs(samples) >= 0.999) < len(samples) * 0.05


def _assert_names(exc: pytest.ExceptionInfo[AudioDecodeError], name: str) -> None:
    assert name in str(exc.value)
    assert not isinstance(exc.value.__cause__, AudioDecodeError)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"this is certainly not audio data\n" * 200)
    with pytest.raises(AudioDecodeError) as exc:
        decode_audio(path)
    _assert_names(exc, str(path))
    assert "not audio" in str(exc.value)
    # Domain errors map to INVALID_ARGUMENT and are still ValueErrors for generic callers.
    assert isinstance(exc.value, InvalidArgument)


def test_garbage_mp3_suffix(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp3"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(AudioDecodeError) as exc:
        decode_audio(path)
    _assert_names(exc, str(path))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.flac"
    path.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match="empty") as exc:
        decode_audio(path)
    _assert_names(exc, str(path))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "does_not_exist.wav"
    with pytest.raises(AudioDecodeError, match="does not exist") as exc:
        decode_audio(path)
    _assert_names(exc, str(path))


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="not a regular file") as exc:
        decode_audio(tmp_path)
    _assert_names(exc, str(tmp_path))


def test_zero_sample_wav(tmp_path: Path) -> None:
    path = tmp_path / "zero.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    assert path.stat().st_size > 0  # a header, no frames
    with pytest.raises(AudioDecodeError, match="no audio samples") as exc:
        decode_audio(path)
    _assert_names(exc, str(path))


def test_no_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "video_only.mkv"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("ffv1", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24")
        for packet in [*stream.encode(frame.reformat(format="yuv420p")), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(AudioDecodeError, match="no audio stream") as exc:
        decode_audio(path)
    _assert_names(exc, str(path))


def test_garbage_and_empty_bytes() -> None:
    with pytest.raises(AudioDecodeError, match="bytes") as exc:
        decode_audio(b"\x00\x01garbage" * 100)
    assert "not audio" in str(exc.value)
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_audio(b"")


def test_pcm16_round_trip() -> None:
    ints = np.array([0, 1, -1, 32767, -32768, 12345], dtype="<i2")
    floats = pcm16_bytes_to_float(ints.tobytes())
    assert floats.dtype == np.float32
    np.testing.assert_array_equal(floats, ints.astype(np.float32) / 32768)
    assert float_to_pcm16_bytes(floats) == ints.tobytes()


def test_pcm16_little_endian_and_clipping() -> None:
    assert pcm16_bytes_to_float(b"\x00\x40").tolist() == [0.5]  # 0x4000 little-endian
    assert pcm16_bytes_to_float(b"").size == 0
    clipped = np.frombuffer(float_to_pcm16_bytes(np.array([2.0, -2.0, 1.0, -1.0])), dtype="<i2")
    assert clipped.tolist() == [32767, -32768, 32767, -32768]


def test_pcm16_odd_length() -> None:
    with pytest.raises(AudioDecodeError, match="even number of bytes"):
        pcm16_bytes_to_float(b"\x00\x01\x02")


def test_write_and_load_wav(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    tone = _tone(SAMPLE_RATE, 1)[0]
    write_wav(path, tone)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE, 1, "PCM_16", "WAV")
    loaded, rate = load_wav_pcm16(path)
    assert rate == SAMPLE_RATE
    np.testing.assert_allclose(loaded, tone, atol=1 / 32768)
    np.testing.assert_allclose(decode_audio(path), tone, atol=1 / 32768)
    with pytest.raises(ValueError, match="mono"):
        write_wav(path, np.zeros((10, 2), dtype=np.float32))
    with pytest.raises(AudioDecodeError, match="does not exist"):
        load_wav_pcm16(tmp_path / "missing.wav")
