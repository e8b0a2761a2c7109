"""The audio of an alert: a ring of each stream's recent audio, and WAV clips kept in Redis."""

from __future__ import annotations

import io
import math
import time
import wave

import numpy as np
import redis.asyncio

from services.constants import SAMPLE_RATE
from services.errors import InvalidArgument
from services.monitor.limits import MonitorLimits
from services.transport import keys

LEVEL_FLOOR_DBFS = -120.0  # the level of digital silence (and of no audio at all)
_FULL_SCALE = 32767
MAX_SAMPLE_RATE = 384_000


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] (clipped; NaN = 0) -> int16; int16 input is returned as is."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise InvalidArgument(f"audio must be mono, one sample per element; got shape {x.shape}.")
    if x.dtype == np.int16:
        return x
    x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.round(np.clip(x, -1.0, 1.0) * _FULL_SCALE).astype(np.int16)


class AudioRing:
    """The last ``seconds`` of one stream's mono audio, addressed by stream time (sample 0 of the
    stream = 0 s), kept as int16."""

    def __init__(
        self, seconds: float = 60.0, sample_rate: int = SAMPLE_RATE, start_time: float = 0.0
    ) -> None:
        """``start_time``: the stream time of the first sample to come (a resumed stream's)."""
        if not seconds > 0 or sample_rate <= 0 or start_time < 0:
            raise InvalidArgument("an audio ring needs seconds > 0, a sample rate > 0 and start_time >= 0.")
        self.sample_rate = sample_rate
        self.capacity = max(1, round(seconds * sample_rate))
        self._buf = np.zeros(self.capacity, np.int16)
        self._first = round(start_time * sample_rate)  # stream sample index of the first sample held
        self._end = self._first  # stream sample index after the newest sample

    @property
    def end_time(self) -> float:
        """Stream time (s) just after the newest sample."""
        return self._end / self.sample_rate

    @property
    def start_time(self) -> float:
        """Stream time (s) of the oldest sample still held."""
        return self._oldest() / self.sample_rate

    def _oldest(self) -> int:
        return max(self._first, self._end - self.capacity)

    def extend(self, samples: np.ndarray) -> None:
        """Append float32 samples in [-1, 1] (or int16)."""
        q = to_int16(samples)
        n = len(q)
        if n > self.capacity:
            q = q[-self.capacity :]
        start = (self._end + n - len(q)) % self.capacity
        head = min(len(q), self.capacity - start)
        self._buf[start : start + head] = q[:head]
        self._buf[: len(q) - head] = q[head:]
        self._end += n

    def _read(self, s0: int, s1: int) -> np.ndarray:
        idx = np.arange(s0, s1) % self.capacity
        return self._buf[idx]

    def slice(self, start_s: float, end_s: float) -> np.ndarray | None:
        """Float32 samples of [start_s, end_s) of stream time (the end clamped to ``end_time``);
        None when any of it has left the ring (or came before ``start_time``)."""
        if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s < 0 or end_s < start_s:
            raise InvalidArgument(f"a slice needs 0 <= start <= end, got [{start_s}, {end_s}).")
        s0 = round(start_s * self.sample_rate)
        s1 = min(round(end_s * self.sample_rate), self._end)
        if s0 < self._oldest():
            return None
        return self._read(s0, max(s0, s1)).astype(np.float32) / _FULL_SCALE

    def level_dbfs(self, span_seconds: float) -> float:
        """RMS level (dBFS, full-scale square = 0) of the newest ``span_seconds`` held; the floor
        ``LEVEL_FLOOR_DBFS`` for digital silence or no audio."""
        n = min(round(span_seconds * self.sample_rate), self._end - self._oldest())
        if n <= 0:
            return LEVEL_FLOOR_DBFS
        x = self._read(self._end - n, self._end).astype(np.float64) / _FULL_SCALE
        rms = math.sqrt(float(np.mean(x * x)))
        return max(LEVEL_FLOOR_DBFS, 20 * math.log10(rms)) if rms > 0 else LEVEL_FLOOR_DBFS


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit mono WAV file of ``samples`` (float32 in [-1, 1], or int16)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(to_int16(samples).astype("<i2").tobytes())
    return buf.getvalue()


_PUT_LUA = """
-- KEYS: clip, clip index; ARGV: WAV bytes, ttl s, now ms, max clips, clip key prefix, alert id
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(ARGV[3]) - ttl * 1000))
local evicted = 0
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #oldest, 2 do
    evicted = evicted + redis.call('DEL', ARGV[5] .. oldest[i])
  end
end
redis.call('EXPIRE', KEYS[2], ttl)
return evicted
"""


class ClipStore:
    """Alert clips per tenant in Redis: one WAV string per alert with a TTL, and a sorted-set index
    that evicts the oldest beyond ``max_clips``. The client must not decode responses."""

    def __init__(self, client: redis.asyncio.Redis, limits: MonitorLimits | None = None) -> None:
        limits = limits or MonitorLimits()
        self.client = client
        self.ttl_seconds = limits.clip_ttl_seconds
        self.max_clip_seconds = limits.max_clip_seconds
        self.max_clips = limits.max_clips
        self._put = client.register_script(_PUT_LUA)

    async def put(self, tenant: str, alert_id: str, samples: np.ndarray, sample_rate: int) -> int:
        """Store the newest ``max_clip_seconds`` of ``samples`` as the alert's clip; how many older
        clips of the tenant were evicted."""
        if (
            isinstance(sample_rate, bool)
            or not isinstance(sample_rate, int)
            or not 0 < sample_rate <= MAX_SAMPLE_RATE
        ):
            raise InvalidArgument(
                f"a clip's sample rate must be 1 to {MAX_SAMPLE_RATE} Hz, got {sample_rate!r}."
            )
        q = to_int16(samples)
        if not len(q):
            raise InvalidArgument("a clip needs at least one sample.")
        q = q[-max(1, math.floor(self.max_clip_seconds * sample_rate)) :]
        clip_keys = [keys.monitor_clip(tenant, alert_id), keys.monitor_clips(tenant)]
        evicted = await self._put(
            keys=clip_keys,
            args=[
                wav_bytes(q, sample_rate),
                self.ttl_seconds,
                int(time.time() * 1000),
                self.max_clips,
                keys.monitor_clip_prefix(tenant),
                alert_id,
            ],
        )
        return int(evicted)

    async def get(self, tenant: str, alert_id: str) -> bytes | None:
        """The alert's WAV file, None when there is none (never stored, expired or evicted)."""
        raw = await self.client.get(keys.monitor_clip(tenant, alert_id))
        return bytes(raw) if raw is not None else None
