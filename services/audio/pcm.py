"""Raw PCM from clients -> 16 kHz mono float32, one chunk at a time (stateful resampling)."""

from __future__ import annotations

import av
import numpy as np

from services.constants import ENCODINGS, LINEAR16, SAMPLE_RATE
from services.errors import InvalidArgument

MIN_RATE, MAX_RATE = 8000, 48000  # Hz accepted from clients
MAX_CHANNELS = 8
_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "4.1", 6: "5.1", 7: "6.1", 8: "7.1"}


def validate_format(sample_rate: int, encoding: str, channels: int) -> None:
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise InvalidArgument(f"sample_rate_hz must be within [{MIN_RATE}, {MAX_RATE}], got {sample_rate}")
    if encoding not in ENCODINGS:
        raise InvalidArgument(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(f"channels must be within [1, {MAX_CHANNELS}], got {channels}")


def bytes_to_frames(data: bytes, encoding: str, channels: int) -> np.ndarray:
    """Interleaved PCM bytes -> (n, channels) float32; clear errors for malformed bytes."""
    width = 2 if encoding == LINEAR16 else 4
    if len(data) % (width * channels):
        raise InvalidArgument(
            f"{encoding} audio with {channels} channel(s) must be a multiple of {width * channels} bytes, "
            f"got {len(data)}"
        )
    if encoding == LINEAR16:
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(x).all():
            raise InvalidArgument("FLOAT32 audio holds NaN or infinite samples")
        if x.size and float(np.abs(x).max()) > 16.0:
            raise InvalidArgument("FLOAT32 audio must be in [-1, 1]; these bytes look like another encoding")
    return x.reshape(-1, channels)


class PcmConverter:
    """Converts a live stream's chunks to 16 kHz mono, keeping resampler state between chunks."""

    def __init__(self, sample_rate: int, encoding: str = LINEAR16, channels: int = 1) -> None:
        validate_format(sample_rate, encoding, channels)
        self.sample_rate, self.encoding, self.channels = sample_rate, encoding, channels
        self._resampler = (
            None
            if sample_rate == SAMPLE_RATE
            else av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        )
        self._pts = 0

    def convert(self, data: bytes) -> np.ndarray:
        frames = bytes_to_frames(data, self.encoding, self.channels)
        mono = frames.mean(axis=1, dtype=np.float32) if self.channels > 1 else frames[:, 0]
        if self._resampler is None or mono.size == 0:
            return np.ascontiguousarray(mono, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(mono[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += mono.size
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)


def pcm_to_mono16k(data: bytes, sample_rate: int, encoding: str = LINEAR16, channels: int = 1) -> np.ndarray:
    conv = PcmConverter(sample_rate, encoding, channels)
    return np.concatenate([conv.convert(data), conv.flush()])
