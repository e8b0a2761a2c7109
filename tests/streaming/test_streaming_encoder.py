"""Streaming encoder = offline encoder (invariant 2), window timing, memory bound, the dB floor."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from services.model.checkpoint import build_model
from services.model.config import tiny_config
from services.model.modeling import MiDashengLM
from services.model.processor import prepare_audio
from services.streaming.encoder import StreamingEncoderSession, TokenUpdate, WindowJob, run_jobs

SR = 16000
WIN_SAMPLES = 161280  # 1008 frames * 160 = 10.08 s
CLOSE_0 = WIN_SAMPLES + 96  # samples that close window 0 (its last frame's right context)
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is several times faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> MiDashengLM:
    torch.manual_seed(0)
    m = build_model(tiny_config(), "cpu").eval()
    bn = m.audio_encoder.init_bn  # non-trivial statistics so init_bn matters
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-60.0, -20.0, bn.num_features))
        bn.running_var.copy_(torch.linspace(50.0, 400.0, bn.num_features))
        bn.weight.copy_(torch.linspace(0.5, 1.5, bn.num_features))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, bn.num_features))
    return m


def wave(n: int, seed: int, amp: float = 0.1) -> np.ndarray:
    """Tones + noise, no digital silence (the dB floor never binds)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    x = (
        0.5 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
        + 0.3 * np.sin(2 * np.pi * 1800 * t)
        + 0.2 * rng.standard_normal(n)
    )
    return (amp * x).astype(np.float32)


def offline(model: MiDashengLM, wav: np.ndarray) -> torch.Tensor:
    """All projector outputs of ``encode_audio`` on the whole clip, (T5, H)."""
    with torch.inference_mode():
        tokens, _ = model.encode_audio(torch.from_numpy(wav)[None], torch.tensor([wav.size]))
    return tokens[0]


def offline_mel(model: MiDashengLM, wav: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        mel, _ = model.audio_encoder.front_end(torch.from_numpy(wav)[None], torch.tensor([wav.size]))
    return mel[0]


@dataclass
class Driver:
    """Runs a session like a live service: jobs after every push, completed in order."""

    model: MiDashengLM
    session: StreamingEncoderSession
    finals: list[TokenUpdate] = field(default_factory=list)
    tentatives: list[tuple[int, TokenUpdate]] = field(default_factory=list)  # (stream samples, update)
    final_jobs: list[WindowJob] = field(default_factory=list)

    def step(self, tentative: bool = True) -> None:
        jobs = self.session.jobs(tentative=tentative)
        feats = run_jobs(self.model.audio_encoder, jobs)
        for job, f in zip(jobs, feats, strict=True):
            assert f.shape == (job.mel.shape[1] // 4, self.model.config.audio_encoder_config.embed_dim)
            if job.final:
                self.final_jobs.append(job)
            for update in self.session.complete(job, f, self.model.audio_projector):
                if update.is_final:
                    done = sum(len(u.tokens) for u in self.finals)
                    assert update.token_start == done, "final tokens out of order or repeated"
                    self.finals.append(update)
                else:
                    assert update.token_start == self.session.final_tokens
                    self.tentatives.append((self.session.samples_received, update))

    def final_tokens(self) -> torch.Tensor:
        return torch.cat([u.tokens for u in self.finals])


def stream(
    model: MiDashengLM, wav: np.ndarray, seed: int, tentative: bool = True, tiny_share: float = 0.3
) -> Driver:
    """Push ``wav`` in random chunk sizes (1 sample .. 2 s; ``tiny_share`` of them < 200 samples), then finish."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    drv = Driver(model, StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor))
    pos = 0
    while pos < wav.size:
        size = int(rng.integers(1, 200)) if rng.random() < tiny_share else int(rng.integers(1, 2 * SR + 1))
        drv.session.push(wav[pos : pos + size])
        pos += size
        drv.step(tentative)
    drv.session.finish()
    drv.step(tentative)
    assert drv.session.done and drv.session.jobs() == []
    return drv


@pytest.mark.parametrize(
    "n",
    [
        3 * SR,
        WIN_SAMPLES,  # exactly 10.08 s: window 0 closes only at finish (reflect at the end)
        2 * WIN_SAMPLES + 480,  # 20.19 s: the last token holds a patch of a window with no valid patch
        int(23.7 * SR),
        31 * SR,
    ],
)
def test_streaming_equals_offline(model: MiDashengLM, n: int) -> None:
    wav = wave(n, seed=n % 7)
    drv = stream(model, wav, seed=n)
    count = model.token_count(n)
    expected = offline(model, wav)[:count]
    got = drv.final_tokens()
    assert got.shape == expected.shape and drv.session.final_tokens == count
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Tentative updates were made along the way and always start at the first non-final token.
    if n > 3 * SR:
        assert drv.tentatives


def test_tentative_tokens_equal_offline_of_truncated_clip(model: MiDashengLM) -> None:
    wav = wave(int(13.5 * SR), seed=3)
    drv = stream(model, wav, seed=5, tiny_share=0.0)
    assert len(drv.tentatives) >= 6
    windows_seen = set()
    for received, update in drv.tentatives:
        truncated = offline(model, wav[:received])
        stop = update.token_start + len(update.tokens)
        # The tail reaches the last full group of 5 patches of the truncated clip.
        assert stop == (1 + received // 160) // 4 // 5
        torch.testing.assert_close(update.tokens, truncated[update.token_start : stop], atol=ATOL, rtol=0)
        windows_seen.add(update.token_start >= 50)
    assert windows_seen == {False, True}  # tentatives of window 0 and of window 1 (after token 50)


def test_window_0_closes_exactly_with_its_lookahead(model: MiDashengLM) -> None:
    cfg = model.config
    wav = wave(CLOSE_0 + 10, seed=1)
    s = StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor)
    s.push(wav[: CLOSE_0 - 1000])
    s.push(wav[CLOSE_0 - 1000 : CLOSE_0 - 1])
    jobs = s.jobs()
    assert s.closed_windows == 0 and [(j.window_index, j.final) for j in jobs] == [(0, False)]
    assert jobs[0].mel.shape[1] == 1008 and jobs[0].valid_patches == 252
    first_rev = jobs[0].revision
    s.push(wav[CLOSE_0 - 1 : CLOSE_0])  # the 161376th sample
    jobs = s.jobs(tentative=False)
    assert s.closed_windows == 1 and [(j.window_index, j.final) for j in jobs] == [(0, True)]
    assert jobs[0].revision == first_rev + 1  # one tentative computation before the final one
    assert jobs[0].mel.shape == (64, 1008) and jobs[0].valid_patches == 252
    # The closed window's mel is exactly the offline mel of the whole (longer) clip.
    torch.testing.assert_close(jobs[0].mel, offline_mel(model, wav)[:, :1008], atol=ATOL, rtol=0)
    # Window 1 holds no full patch yet: nothing tentative to run; the final job stays offered.
    again = s.jobs()
    assert len(again) == 1 and again[0] is jobs[0]


def test_retained_samples_are_bounded(model: MiDashengLM) -> None:
    cfg = model.config
    s = StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor)
    rng = np.random.default_rng(0)
    wav = wave(60 * SR, seed=2)
    pos = 0
    while pos < wav.size:
        size = int(rng.integers(1, 2 * SR))
        s.push(wav[pos : pos + size])
        pos += size
        assert s.retained_samples < WIN_SAMPLES + 512
    s.push(wave(25 * SR, seed=4))  # one big push: closes two windows at once, still bounded after
    assert s.retained_samples < WIN_SAMPLES + 512
    assert s.closed_windows == (85 * SR - 96) // WIN_SAMPLES and s.pending_jobs == s.closed_windows
    assert s.samples_received == 85 * SR


def _quiet_then_loud(quiet: str) -> np.ndarray:
    """12 s of digital silence (or +-1 LSB 16-bit dither), then 19 s of noise + tones with a
    louder burst in window 1 (14..15 s), so window 1 holds the clip's loudest frame."""
    loud = wave(19 * SR, seed=6)
    loud[2 * SR : 3 * SR] += 0.8 * np.sin(2 * np.pi * 1000 * np.arange(SR) / SR).astype(np.float32)
    head = np.zeros(12 * SR, dtype=np.float32)
    if quiet == "dither":
        head = (np.random.default_rng(0).integers(-1, 2, head.size) / 32768).astype(np.float32)
    return np.concatenate([head, loud])


@pytest.mark.parametrize("quiet", ["zeros", "dither"])
def test_near_silence_then_loud_sound(model: MiDashengLM, quiet: str) -> None:
    """The 120 dB floor binds in window 0 (near silence, clip maximum only in window 1): streaming
    differs there, by a measured and bounded amount; everywhere else it equals offline."""
    wav = _quiet_then_loud(quiet)
    drv = stream(model, wav, seed=9)
    count = model.token_count(wav.size)
    expected = offline(model, wav)[:count]
    got = drv.final_tokens()
    assert got.shape == expected.shape

    mel_off = offline_mel(model, wav)
    peak = float(mel_off.max())
    mel_stream = torch.cat([j.mel for j in sorted(drv.final_jobs, key=lambda j: j.window_index)], dim=1)
    assert mel_stream.shape == mel_off.shape
    mel_diff = [
        float((mel_stream[:, w * 1008 : (w + 1) * 1008] - mel_off[:, w * 1008 : (w + 1) * 1008]).abs().max())
        for w in range(-(-mel_stream.shape[1] // 1008))
    ]
    bound = (peak - 120.0) - (-100.0)  # offline floor minus the lowest possible log-mel (power 1e-10)
    floor_binds = float((mel_off[:, :1008] <= peak - 120.0 + 1e-4).float().mean())
    if quiet == "zeros":
        # Streaming keeps digital silence at -100 dB; offline lifts it to (clip max - 120 dB).
        assert mel_diff[0] == pytest.approx(bound, abs=1e-3) and floor_binds == 1.0
    else:
        # Only the few dither bins below (clip max - 120 dB) differ, by less than for zeros.
        assert 0.0 < mel_diff[0] <= bound + 1e-3 and 0.0 < floor_binds < 0.05
    # Window 1 holds the clip's loudest frame (running max = clip max); later windows are loud.
    assert max(mel_diff[1:]) < 1e-3

    token_diff = (got - expected).abs().amax(dim=1)
    # Tokens 0..49 lie in window 0, token 50 straddles windows 0 and 1 (patches 250..254).
    torch.testing.assert_close(got[51:], expected[51:], atol=ATOL, rtol=0)
    assert 1e-3 < float(token_diff[:51].max()) < 10.0  # bounded (tiny random model; see docs/streaming.md)
    print(
        f"\n{quiet}->loud: clip max {peak:.2f} dB, window-0 bins at the offline floor {100 * floor_binds:.1f} %, "
        f"window-0 max mel diff {mel_diff[0]:.2f} dB, tokens 0..50 max abs diff {float(token_diff[:51].max()):.4f} "
        f"(mean {float(token_diff[:51].mean()):.4f}; token max abs {float(expected.abs().max()):.4f}), "
        f"tokens 51+ max diff {float(token_diff[51:].max()):.1e}"
    )


def test_loud_then_digital_silence_is_exact(model: MiDashengLM) -> None:
    """Silence after the loudest sound: the running max already equals the clip max, so the floor
    is the offline floor and streaming equals offline even though it binds."""
    wav = np.concatenate([wave(8 * SR, seed=1), np.zeros(7 * SR, dtype=np.float32)])
    drv = stream(model, wav, seed=2)
    expected = offline(model, wav)[: model.token_count(wav.size)]
    torch.testing.assert_close(drv.final_tokens(), expected, atol=ATOL, rtol=0)


def test_short_and_empty_streams_and_push_after_finish(model: MiDashengLM) -> None:
    cfg = model.config
    # Shorter than 0.2 s, pushed one sample at a time with empty pushes in between: finish()
    # zero-pads to 3200 samples, like prepare_audio, so the token is offline's of the padded clip.
    wav = wave(1000, seed=3)
    s = StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor)
    drv = Driver(model, s)
    for i in range(wav.size):
        s.push(wav[i : i + 1])
        s.push(np.zeros(0, dtype=np.float32))
    assert s.samples_received == 1000 and s.seconds_received == pytest.approx(1000 / SR)
    drv.step()  # one patch of audio: a tentative job, but no full token yet
    assert drv.finals == [] and drv.tentatives == []
    s.finish()
    drv.step()
    padded = prepare_audio(wav).numpy()
    assert padded.size == 3200 and model.token_count(1000) == 1
    torch.testing.assert_close(drv.final_tokens(), offline(model, padded)[:1], atol=ATOL, rtol=0)
    assert s.samples_received == 1000 and s.done
    with pytest.raises(ValueError):
        s.push(wav)
    s.finish()  # idempotent

    empty = StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor)
    empty.push(np.zeros(0, dtype=np.float32))
    assert empty.jobs() == [] and empty.samples_received == 0
    empty.finish()
    assert empty.jobs() == [] and empty.done and empty.final_tokens == 0
    with pytest.raises(ValueError):
        empty.push(np.zeros(3, dtype=np.float32))

    bad = StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor)
    with pytest.raises(ValueError):
        bad.push(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError):
        bad.push(np.zeros((2, 2), dtype=np.float32))


def test_run_jobs_batches_sessions_like_single_runs(model: MiDashengLM) -> None:
    cfg = model.config
    jobs: list[WindowJob] = []
    for n, seed in ((5 * SR, 1), (CLOSE_0 + 3 * SR, 2), (7 * SR + 123, 3)):
        s = StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor)
        s.push(wave(n, seed))
        jobs += s.jobs()
    assert len({j.mel.shape[1] for j in jobs}) > 1 and any(j.final for j in jobs)
    batched = run_jobs(model.audio_encoder, jobs)
    for job, feats in zip(jobs, batched, strict=True):
        (alone,) = run_jobs(model.audio_encoder, [job])
        torch.testing.assert_close(feats, alone, atol=1e-5, rtol=0)


def test_stale_and_repeated_completions_are_ignored(model: MiDashengLM) -> None:
    cfg = model.config
    wav = wave(CLOSE_0 + 4 * SR, seed=5)
    s = StreamingEncoderSession(cfg.audio_encoder_config, cfg.subsample_factor)
    s.push(wav[: 6 * SR])
    (old,) = s.jobs()
    (old_feats,) = run_jobs(model.audio_encoder, [old])
    s.push(wav[6 * SR :])  # window 0 closes: the tentative job is stale
    assert s.complete(old, old_feats, model.audio_projector) == []
    jobs = s.jobs()
    assert [(j.window_index, j.final) for j in jobs] == [(0, True), (1, False)]
    feats = run_jobs(model.audio_encoder, jobs)
    ups = s.complete(jobs[0], feats[0], model.audio_projector)
    assert [(u.token_start, len(u.tokens), u.is_final) for u in ups] == [(0, 50, True)]
    assert s.complete(jobs[0], feats[0], model.audio_projector) == []  # redelivery: no duplicate
    tail = s.complete(jobs[1], feats[1], model.audio_projector)
    assert [(u.token_start, u.is_final) for u in tail] == [(50, False)]
    assert s.jobs() == []  # nothing new until more audio arrives
    with pytest.raises(ValueError):
        s.complete(jobs[1], feats[1][:3], model.audio_projector)
