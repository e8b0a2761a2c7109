"""Audio decoding and PCM helpers.

Everything the model sees is float32 mono at :data:`SAMPLE_RATE`. Decoding goes
through PyAV (FFmpeg) for every container and codec so that resampling and
down-mixing are done by one well-tested implementation (libswresample) rather
than a mix of libraries with subtly different behaviour.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from services.constants import SAMPLE_RATE
from services.errors import AudioDecodeError

PCM16_SCALE = 32768.0
"""Divisor mapping int16 samples onto [-1, 1)."""

PCM16_BYTES_PER_SAMPLE = 2

AudioSource = str | os.PathLike[str] | bytes | bytearray | memoryview

# The demuxers FFmpeg may pick for audio that arrives as bytes (a client's encoded_audio): audio
# containers only. Playlist and concatenation demuxers (hls, concat, ...) would open further URLs or
# files, so probing never selects them; nested opens are limited to the file protocol.
AUDIO_DEMUXERS = "wav,w64,flac,mp3,ogg,matroska,webm,mov,mp4,m4a,aac,aiff,caf,amr"
_BYTES_OPTIONS = {"format_whitelist": AUDIO_DEMUXERS, "protocol_whitelist": "file"}

# Errors PyAV/FFmpeg raise for unreadable input. av.FFmpegError covers codec and
# demuxer failures; OSError/ValueError/EOFError cover I/O and a few PyAV checks
# (for example a frame that no longer matches the resampler's setup).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (av.FFmpegError, OSError, ValueError, EOFError)


def _describe(source: AudioSource) -> str:
    """Name the input in error messages: the path, or the size of in-memory bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<audio bytes, {len(source)} bytes>"
    return str(Path(source))


def decode_audio(
    path_or_bytes: AudioSource, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Decode any audio file (path or file contents) to float32 mono in [-1, 1] at ``sample_rate``.

    Bytes are demuxed only as one of :data:`AUDIO_DEMUXERS`. With ``max_seconds`` decoding stops
    as soon as the audio grows past it (a few MB of compressed silence cannot expand to GBs).

    Raises :class:`AudioDecodeError` when the input is missing, empty, not audio,
    has no audio stream, decodes to zero samples or is longer than ``max_seconds``.
    """
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}.")
    name = _describe(path_or_bytes)

    source: str | io.BytesIO
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        if len(path_or_bytes) == 0:
            raise AudioDecodeError(f"Cannot decode audio {name}: the data is empty.")
        source = io.BytesIO(bytes(path_or_bytes))
    else:
        path = Path(path_or_bytes)
        if not path.exists():
            raise AudioDecodeError(f"Cannot decode audio file {name}: the file does not exist.")
        if not path.is_file():
            raise AudioDecodeError(f"Cannot decode audio file {name}: it is not a regular file.")
        if path.stat().st_size == 0:
            raise AudioDecodeError(f"Cannot decode audio file {name}: the file is empty.")
        source = str(path)
        name = f"file {name}"

    limit = None if max_seconds is None else int(max_seconds * sample_rate)
    try:
        samples = _read_native_rate(source, sample_rate, limit, name)
        if samples is None:
            samples = _decode_with_av(source, sample_rate, name, limit)
    except AudioDecodeError:
        raise
    except _DECODE_ERRORS as exc:
        raise AudioDecodeError(f"Cannot decode audio {name}: it is unreadable or not audio ({exc}).") from exc

    if samples.size == 0:
        raise AudioDecodeError(f"Cannot decode audio {name}: it contains no audio samples.")
    # Down-mixing correlated channels can overshoot full scale; the model contract is [-1, 1].
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples


def _too_long(name: str, limit: int, sample_rate: int) -> AudioDecodeError:
    return AudioDecodeError(
        f"Cannot decode audio {name}: it is longer than {limit / sample_rate:.0f} s; "
        "stream it or caption it in segments."
    )


def _read_native_rate(
    source: str | io.BytesIO, sample_rate: int, limit: int | None = None, name: str = ""
) -> np.ndarray | None:
    """Fast path: a WAV/FLAC file already at ``sample_rate`` is read by libsndfile (about 20x faster
    than demuxing with PyAV). Channels are averaged, as the PyAV path does. None = use PyAV."""
    if not isinstance(source, str):
        return None
    try:
        info = sf.info(source)
        if info.samplerate != sample_rate or info.format not in ("WAV", "FLAC"):
            return None
    except Exception:  # anything libsndfile cannot handle goes through PyAV and its error messages
        return None
    if limit is not None and info.frames > limit:
        raise _too_long(name, limit, sample_rate)
    try:
        data, _ = sf.read(source, dtype="float32", always_2d=True)
    except Exception:  # anything libsndfile cannot handle goes through PyAV and its error messages
        return None
    return np.ascontiguousarray(data.mean(axis=1, dtype=np.float32))


def _new_resampler(sample_rate: int) -> av.AudioResampler:
    """Resampler to float32 mono; rematrix_maxval=1 keeps the down-mix within full scale."""
    # libswresample's default float down-mix sums stereo at 1/sqrt(2) per channel,
    # which lifts correlated channels by 3 dB and clips full-scale material.
    return av.AudioResampler(
        format="flt", layout="mono", rate=sample_rate, options={"rematrix_maxval": "1.0"}
    )


def _decode_with_av(
    source: str | io.BytesIO, sample_rate: int, name: str, limit: int | None = None
) -> np.ndarray:
    """Demux the first audio stream and resample it to float32 mono ``sample_rate`` (at most
    ``limit`` samples, else AudioDecodeError as soon as they are exceeded)."""
    chunks: list[np.ndarray] = []
    total = 0

    def collect(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for out in frames:
            x = out.to_ndarray().reshape(-1)
            total += x.size
            if limit is not None and total > limit:
                raise _too_long(name, limit, sample_rate)
            chunks.append(x)

    options = _BYTES_OPTIONS if isinstance(source, io.BytesIO) else None
    # metadata_errors="ignore": a badly encoded tag must not make the audio unreadable.
    with av.open(source, mode="r", metadata_errors="ignore", options=options) as container:
        if not container.streams.audio:
            raise AudioDecodeError(f"Cannot decode audio {name}: it has no audio stream.")
        stream = container.streams.audio[0]
        resampler = _new_resampler(sample_rate)
        input_key: tuple[str, str, int] | None = None
        for frame in container.decode(stream):
            key = (frame.format.name, frame.layout.name, frame.sample_rate)
            if input_key is not None and key != input_key:
                # PyAV's resampler is fixed to its first frame's layout/rate; some streams
                # (e.g. AAC, concatenated mp3) change mid-way, so drain it and start anew.
                collect(resampler.resample(None))
                resampler = _new_resampler(sample_rate)
            input_key = key
            collect(resampler.resample(frame))
        # The resampler buffers a filter's worth of samples; without flushing the tail is lost.
        collect(resampler.resample(None))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def pcm16_bytes_to_float(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Convert little-endian signed 16-bit PCM bytes to float32 samples in [-1, 1)."""
    if len(data) % PCM16_BYTES_PER_SAMPLE:
        raise AudioDecodeError(f"PCM16 data must have an even number of bytes, got {len(data)} bytes.")
    ints = np.frombuffer(bytes(data), dtype="<i2")
    return (ints.astype(np.float32) / PCM16_SCALE).astype(np.float32, copy=False)


def float_to_pcm16_bytes(samples: np.ndarray) -> bytes:
    """Convert float samples in [-1, 1] to little-endian signed 16-bit PCM bytes (clipping)."""
    arr = np.asarray(samples, dtype=np.float64).reshape(-1)
    # Same scale as pcm16_bytes_to_float so int16 -> float -> int16 is lossless.
    ints = np.clip(np.rint(arr * PCM16_SCALE), -PCM16_SCALE, PCM16_SCALE - 1)
    return ints.astype("<i2").tobytes()


def write_wav(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float samples in [-1, 1] as a 16-bit PCM WAV file."""
    arr = np.asarray(samples, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"write_wav expects mono 1-D samples, got shape {arr.shape}.")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}.")
    sf.write(str(path), np.clip(arr, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def load_wav_pcm16(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file (e.g. one made by :func:`write_wav`) as float32 mono and its rate.

    No resampling is done; use :func:`decode_audio` for model input.
    """
    name = str(Path(path))
    if not Path(path).is_file():
        raise AudioDecodeError(f"Cannot read WAV file {name}: the file does not exist.")
    try:
        data, rate = sf.read(name, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioDecodeError(f"Cannot read WAV file {name}: {exc}.") from exc
    return data.mean(axis=1, dtype=np.float32), int(rate)
