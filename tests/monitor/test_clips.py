"""AudioRing slicing and levels; ClipStore WAV round trip, TTL, per-tenant cap and isolation."""

from __future__ import annotations

import io
import math
import wave
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio

from services.constants import SAMPLE_RATE
from services.errors import InvalidArgument
from services.monitor.clips import LEVEL_FLOOR_DBFS, AudioRing, ClipStore, to_int16
from services.monitor.limits import MonitorLimits
from services.transport import keys

Run = Callable[[Any], Any]
STEP = 1 / 1000  # sample i of the test signals is i * STEP: every sample distinct in int16


def ramp(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n) * STEP).astype(np.float32)


def test_ring_slices_across_the_wraparound() -> None:
    ring = AudioRing(seconds=1.0, sample_rate=100)  # 100 samples
    written = 0
    for n in (30, 45, 60, 7, 58, 50):  # 250 samples: the ring wrapped twice
        ring.extend(ramp(written, n))
        written += n
    assert ring.end_time == 2.5 and ring.start_time == 1.5
    got = ring.slice(1.6, 2.4)
    assert got is not None and got.dtype == np.float32
    np.testing.assert_allclose(got, ramp(160, 80), atol=1 / 32767)
    full = ring.slice(1.5, 2.5)
    assert full is not None and len(full) == 100
    np.testing.assert_allclose(full, ramp(150, 100), atol=1 / 32767)
    assert ring.slice(1.49, 2.0) is None  # its start has left the ring
    clamped = ring.slice(2.2, 9.0)  # the end is clamped to what has arrived
    assert clamped is not None and len(clamped) == 30
    ring.extend(ramp(written, 230))  # one chunk longer than the ring
    assert ring.start_time == 3.8
    tail = ring.slice(3.8, 4.8)
    assert tail is not None
    np.testing.assert_allclose(tail, ramp(380, 100), atol=1 / 32767)
    with pytest.raises(InvalidArgument):
        ring.slice(4.0, 3.9)
    with pytest.raises(InvalidArgument, match="mono"):
        ring.extend(np.zeros((2, 10), np.float32))


def test_ring_of_a_resumed_stream_starts_at_its_start_time() -> None:
    ring = AudioRing(seconds=2.0, sample_rate=100, start_time=10.0)
    ring.extend(ramp(0, 50))
    assert (ring.start_time, ring.end_time) == (10.0, 10.5)
    assert ring.slice(9.9, 10.2) is None
    got = ring.slice(10.0, 10.2)
    assert got is not None
    np.testing.assert_allclose(got, ramp(0, 20), atol=1 / 32767)


def test_levels() -> None:
    ring = AudioRing(seconds=2.0)
    assert ring.level_dbfs(1.0) == LEVEL_FLOOR_DBFS  # nothing yet
    ring.extend(np.zeros(SAMPLE_RATE, np.float32))
    assert ring.level_dbfs(1.0) == LEVEL_FLOOR_DBFS
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    ring.extend((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert ring.level_dbfs(1.0) == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    assert ring.level_dbfs(2.0) == pytest.approx(20 * math.log10(0.5 / 2), abs=0.01)  # half silent
    ring.extend(np.where(np.arange(800) % 2, 1.0, -1.0).astype(np.float32))  # full-scale square
    assert ring.level_dbfs(0.05) == pytest.approx(0.0, abs=0.001)
    assert to_int16(np.array([2.0, -2.0, np.nan], np.float32)).tolist() == [32767, -32767, 0]


def wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()


def test_clip_round_trip_ttl_and_length_cap(run_redis: Run) -> None:
    rng = np.random.default_rng(0)
    audio = rng.uniform(-1, 1, 3 * SAMPLE_RATE).astype(np.float32)

    async def scenario(client: redis.asyncio.Redis) -> None:
        store = ClipStore(client, MonitorLimits(clip_ttl_seconds=3600, max_clip_seconds=2.0))
        assert await store.get("acme", "0001-a") is None
        assert await store.put("acme", "0001-a", audio[: SAMPLE_RATE // 2], SAMPLE_RATE) == 0
        data = await store.get("acme", "0001-a")
        assert data is not None and data[:4] == b"RIFF"
        samples, rate = wav_samples(data)
        assert rate == SAMPLE_RATE and np.array_equal(samples, to_int16(audio[: SAMPLE_RATE // 2]))
        assert 3590 <= await client.ttl(keys.monitor_clip("acme", "0001-a")) <= 3600
        assert 3590 <= await client.ttl(keys.monitor_clips("acme")) <= 3600
        await store.put("acme", "0002-b", audio, 8000)  # 6 s at 8 kHz: the newest 2 s are kept
        long, rate = wav_samples(await store.get("acme", "0002-b") or b"")
        assert rate == 8000 and np.array_equal(long, to_int16(audio[-16000:]))
        with pytest.raises(InvalidArgument, match="at least one sample"):
            await store.put("acme", "0003-c", np.zeros(0, np.float32), SAMPLE_RATE)
        with pytest.raises(InvalidArgument, match="sample rate"):
            await store.put("acme", "0003-c", audio, 0)
        with pytest.raises(InvalidArgument, match="alert id"):
            await store.put("acme", "bad id", audio, SAMPLE_RATE)

    run_redis(scenario)


def test_clips_per_tenant_are_capped_and_isolated(run_redis: Run) -> None:
    clip = np.linspace(-0.5, 0.5, 100, dtype=np.float32)

    async def scenario(client: redis.asyncio.Redis) -> None:
        store = ClipStore(client, MonitorLimits(max_clips=3))
        evicted = [await store.put("acme", f"000{i}-x", clip, SAMPLE_RATE) for i in range(1, 6)]
        assert evicted == [0, 0, 0, 1, 1]
        present = [i for i in range(1, 6) if await store.get("acme", f"000{i}-x") is not None]
        assert present == [3, 4, 5]
        assert await client.zcard(keys.monitor_clips("acme")) == 3
        assert not await client.exists(keys.monitor_clip("acme", "0001-x"))
        # Another tenant reads none of them and has its own cap.
        assert await store.get("globex", "0005-x") is None and await store.get("", "0005-x") is None
        await store.put("globex", "0005-x", clip[:10], SAMPLE_RATE)
        other, _ = wav_samples(await store.get("globex", "0005-x") or b"")
        mine, _ = wav_samples(await store.get("acme", "0005-x") or b"")
        assert len(other) == 10 and len(mine) == 100
        assert await client.zcard(keys.monitor_clips("acme")) == 3

    run_redis(scenario)
