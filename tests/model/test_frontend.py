"""Log-mel frontend against an independent numpy/scipy implementation of the reference recipe."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch

from services.model.config import EncoderConfig
from services.model.frontend import LogMelFrontend, mel_filterbank, num_frames
from tests.model.utils import SR, batch_audio, make_wave, sine

N_FFT, HOP, N_MELS = 512, 160, 64


def np_hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def np_mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def np_filterbank(
    n_fft: int = N_FFT, n_mels: int = N_MELS, sr: int = SR, f_min: float = 0.0, f_max: float = 8000.0
) -> np.ndarray:
    """HTK triangles between n_mels + 2 equally spaced mel points, peak 1, no normalisation."""
    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = np_mel_to_hz(np.linspace(np_hz_to_mel(f_min), np_hz_to_mel(f_max), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (freqs - lo) / (centre - lo)
        falling = (hi - freqs) / (hi - centre)
        fb[:, m] = np.maximum(0.0, np.minimum(rising, falling))
    return fb


def np_log_mel(x: np.ndarray, window: str | tuple = "hann") -> np.ndarray:
    """(N,) -> (n_mels, 1 + N // hop) dB, float64, per-item 120 dB floor."""
    x = x.astype(np.float64)
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    win = scipy.signal.get_window(window, N_FFT, fftbins=True)
    n = 1 + len(x) // HOP
    frames = np.stack([padded[t * HOP : t * HOP + N_FFT] for t in range(n)])
    power = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2  # (T, 257)
    mel = power @ np_filterbank()  # (T, 64)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    return np.maximum(db, db.max() - 120.0).T


@pytest.fixture(scope="module")
def frontend() -> LogMelFrontend:
    return LogMelFrontend(EncoderConfig())


def test_filterbank_matches_htk_formula() -> None:
    fb = mel_filterbank(257, 0.0, 8000.0, 64, 16000)
    assert fb.dtype == torch.float32 and fb.shape == (257, 64)
    ref = np_filterbank()
    np.testing.assert_allclose(fb.numpy(), ref, atol=1e-6, rtol=0)
    # Sanity of the reference itself: unnormalised triangles peak near 1, every filter is non-empty.
    assert (ref.max(axis=0) > 0.5).all() and ref.max() <= 1.0


def test_filterbank_is_not_slaney() -> None:
    """Guard: a Slaney-scale (or area-normalised) bank differs by far more than the tolerance."""
    freqs = np.linspace(0, 8000, 257)
    fb = mel_filterbank(257, 0.0, 8000.0, 64, 16000).numpy()
    # First filter centre on the HTK scale:
    centre = np_mel_to_hz(np.linspace(0, np_hz_to_mel(8000.0), 66))[1]
    peak_bin = int(np.argmax(fb[:, 0]))
    assert abs(freqs[peak_bin] - centre) <= 31.25 / 2 + 1e-9


def test_frontend_constants(frontend: LogMelFrontend) -> None:
    window = scipy.signal.get_window("hann", 512, fftbins=True)
    np.testing.assert_allclose(frontend._window.numpy(), window, atol=1e-6)
    np.testing.assert_allclose(frontend._fb.numpy(), np_filterbank(), atol=1e-6)


@pytest.mark.parametrize("seconds,seed", [(1.0, 0), (0.7531, 1)])
def test_log_mel_matches_numpy(frontend: LogMelFrontend, seconds: float, seed: int) -> None:
    x = make_wave(seconds, seed=seed, amp=0.3)
    ref = np_log_mel(x)
    out, frames = frontend(torch.from_numpy(x)[None])
    got = out[0].double().numpy()
    assert got.shape == ref.shape == (64, 1 + len(x) // HOP)
    assert frames.tolist() == [1 + len(x) // HOP]
    loud = ref > ref.max() - 80.0  # away from the floor, where fp32 rounding is not amplified by the log
    assert loud.mean() > 0.9
    np.testing.assert_allclose(got[loud], ref[loud], atol=1e-2, rtol=0)
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=0)
    # The same comparison catches a wrong window (Hamming instead of periodic Hann).
    wrong = np_log_mel(x, window="hamming")
    assert np.abs(got[loud] - wrong[loud]).max() > 0.1


def test_sine_peaks_in_the_right_mel_bin(frontend: LogMelFrontend) -> None:
    x = sine(0.5, 1000.0, 0.5)
    out, _ = frontend(torch.from_numpy(x)[None])
    centres = np_mel_to_hz(np.linspace(0, np_hz_to_mel(8000.0), 66))[1:-1]
    assert int(out[0, :, 10:-10].mean(dim=1).argmax()) == int(np.argmin(np.abs(centres - 1000.0)))


@pytest.mark.parametrize("n", [3200, 3201, 3359, 3360, 3519, 16000, 16159, 48123])
def test_frame_count(frontend: LogMelFrontend, n: int) -> None:
    x = make_wave(n / SR, seed=2)
    assert len(x) == n
    out, frames = frontend(torch.from_numpy(x)[None])
    assert out.shape == (1, 64, 1 + n // 160)
    assert frames.tolist() == [1 + n // 160] == [num_frames(n)]


def _sine_then_silence(amp: float) -> np.ndarray:
    return np.concatenate([sine(0.5, 440.0, amp), np.zeros(8000, np.float32)])


def test_top_db_floor_is_per_item(frontend: LogMelFrontend) -> None:
    loud, quiet = _sine_then_silence(0.5), _sine_then_silence(1e-4)
    out, _ = frontend(*batch_audio([loud, quiet]))
    lo, qu = out[0], out[1]
    # Loud item: silence sits exactly on its own floor, max - 120 dB (above the -100 dB amin).
    assert float(lo.max()) - 120.0 > -100.0
    torch.testing.assert_close(lo.min(), lo.max() - 120.0)
    torch.testing.assert_close(lo[:, -20:], torch.full_like(lo[:, -20:], float(lo.max()) - 120.0))
    # Quiet item: its floor (max - 120) is below -100 dB, so digital silence reads amin = -100 dB,
    # not the loud item's floor as a batch-wide top_db would give.
    assert float(qu.max()) - 120.0 < -100.0
    torch.testing.assert_close(qu[:, -20:], torch.full_like(qu[:, -20:], -100.0))
    # A pure sine's far side bands sit ~90 dB down where fp32 STFT leakage dominates: compare the rest.
    for got, x in ((lo, loud), (qu, quiet)):
        ref = np_log_mel(x)
        near = ref > ref.max() - 60.0
        np.testing.assert_allclose(got.double().numpy()[near], ref[near], atol=1e-2)
    # Batch result equals each item alone.
    for i, x in enumerate([loud, quiet]):
        alone, _ = frontend(torch.from_numpy(x)[None])
        assert torch.equal(out[i], alone[0])


def test_padded_batch_equals_each_item_alone(frontend: LogMelFrontend) -> None:
    clips = [make_wave(0.31, seed=1), _sine_then_silence(0.5)[:12345], make_wave(1.0, seed=3, amp=0.01)]
    audio, lengths = batch_audio(clips)
    out, frames = frontend(audio, lengths)
    assert frames.tolist() == [1 + len(c) // 160 for c in clips]
    assert out.shape == (3, 64, max(frames.tolist()))
    for i, c in enumerate(clips):
        alone, _ = frontend(torch.from_numpy(c)[None])
        t = int(frames[i])
        assert torch.equal(out[i, :, :t], alone[0])
        # Frames past the item's end hold its floor value (its minimum), not zeros of the padding.
        assert torch.equal(out[i, :, t:], torch.full_like(out[i, :, t:], float(alone.min())))


def test_frontend_stays_fp32_after_casting(frontend: LogMelFrontend) -> None:
    fe = LogMelFrontend(EncoderConfig()).to(torch.bfloat16)
    x = make_wave(0.5, seed=7)
    out, _ = fe(torch.from_numpy(x)[None].to(torch.bfloat16))
    ref, _ = frontend(torch.from_numpy(x)[None].to(torch.bfloat16).float())
    assert out.dtype == torch.float32 and torch.equal(out, ref)
