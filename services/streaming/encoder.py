"""Streaming Dasheng encoder: PCM chunks of any size -> the audio tokens of the offline model.

The offline model (``MiDashengLM.encode_audio``) turns a whole clip of ``N`` samples into

* ``F = 1 + N // 160`` log-mel frames; frame ``f`` is centred on sample ``160 f`` and reads
  samples ``[160 f - 256, 160 f + 256)``, with reflect padding only at the clip's two ends;
* non-overlapping attention windows of 1008 frames (252 patches of 4 frames, 10.08 s), each
  attended on its own, keys masked beyond ``N // 640`` valid patches;
* 5 Hz tokens, each stacking 5 consecutive *global* patches (token 50 = patches 250..254 straddles
  windows 0 and 1); ``(F // 4) % 5`` trailing patches are dropped.

A :class:`StreamingEncoderSession` reproduces that from a stream:

* **Windows close on lookahead.** Window ``j``'s last frame needs samples up to
  ``160 (1008 (j + 1) - 1) + 255``, so the window *closes* (its features never change again) once
  ``samples_received >= 160 * 1008 * (j + 1) + 96``. Its mel is computed with
  ``torch.stft(center=False)`` on ``[256 samples of left context | window | 256 samples of right
  context]``: real samples, except reflect padding at the stream start (window 0) and, for the last
  window, at the stream end (``finish()``). That is exactly the offline STFT of those frames.
* **The open window is tentative.** ``jobs()`` also offers the open window as it stands, its mel
  computed as if the stream ended now (reflect padding at the current end), i.e. like the offline
  model on the clip truncated here. Its tokens are revised until the window closes.
* **The 120 dB floor uses the running maximum.** Offline, every bin is clamped to
  ``max(whole clip) - 120 dB``, which a stream cannot know. Here each window is clamped to
  ``R - 120 dB`` with ``R`` the maximum log-mel over every *final* frame computed so far, including
  this window's own frames (a tentative window's frames count only for itself). ``R`` never exceeds
  the clip maximum ``G``, so a window equals offline whenever each of its bins is at least
  ``G - 120 dB`` (the floor binds nowhere: anything but near digital silence), or whenever
  ``R == G`` (the loudest frame of the clip arrived in or before this window; always true for the
  last window). Otherwise only the bins below ``G - 120 dB`` differ: streaming keeps them at
  ``max(bin, R - 120)`` instead of ``G - 120``. See ``docs/streaming.md`` for measured figures.
* **Streams shorter than 0.2 s** are zero-padded to 3200 samples on ``finish()``, like
  ``services.model.processor.prepare_audio``, so they give the offline tokens of the padded clip.
  An empty stream gives no tokens.

Work is split so a service can batch it across sessions: ``jobs()`` lists the encoder forwards to
run (:class:`WindowJob`), :func:`run_jobs` runs any list of jobs (from many sessions) in one batch,
and ``complete()`` hands each job's features back to its session, which projects them into
:class:`TokenUpdate`\\ s. Complete jobs in the order ``jobs()`` lists them.

Memory is bounded: the session keeps only the samples the open window still needs (its own and the
256 before it, < 10.08 s + 512 samples), the mel of closed windows whose jobs have not been
completed yet (the caller's backlog, visible as ``pending_jobs``), and fewer than 5 encoder
patches that wait for the next window to make up a token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from services.model.config import EncoderConfig
from services.model.dasheng import DashengEncoder
from services.model.frontend import AMIN, TOP_DB, LogMelFrontend
from services.model.modeling import AudioProjector
from services.model.processor import MIN_SAMPLES


class EncoderWindow(Protocol):
    """What the encoder needs of one attention window (a :class:`WindowJob`, or a window of a clip)."""

    @property
    def mel(self) -> torch.Tensor: ...  # (n_mels, T) fp32 log-mel, 0 < T <= 1008 frames

    @property
    def valid_patches(self) -> int: ...  # patches holding real audio (keys beyond are masked)


@dataclass(eq=False)
class WindowJob:
    """One encoder forward to run (batched across sessions by the caller); compared by identity."""

    window_index: int
    mel: torch.Tensor  # (n_mels, T) fp32 log-mel of this window's frames (T <= 1008)
    valid_patches: int  # patches of this window that hold real audio (keys beyond are masked)
    final: bool  # True when the window is closed (its features will never change)
    revision: int  # 0 for the first computation of a window, +1 each recomputation


@dataclass(eq=False)
class TokenUpdate:
    """5 Hz audio tokens ``[token_start, token_start + n)`` of the stream.

    Final tokens are sent exactly once, in order, and never change. A tentative update replaces
    every tentative token at or after its ``token_start`` that an earlier update sent.
    """

    token_start: int  # index of the first 5 Hz token in the stream
    tokens: torch.Tensor  # (n, H) projector outputs
    is_final: bool  # final tokens never change; tentative tokens are replaced by later updates
    revision: int  # revision of the window job that produced this update
    stream_seconds: float  # audio received when this update was made


class _SampleBuffer:
    """Samples ``[start, end)`` of a stream (absolute indices) in a growable fp32 array."""

    def __init__(self) -> None:
        self._data = np.zeros(0, dtype=np.float32)
        self._len = 0
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + self._len

    def __len__(self) -> int:
        return self._len

    def append(self, x: np.ndarray) -> None:
        need = self._len + x.size
        if need > self._data.size:
            grown = np.empty(max(need, 2 * self._data.size, 4096), dtype=np.float32)
            grown[: self._len] = self._data[: self._len]
            self._data = grown
        self._data[self._len : need] = x
        self._len = need

    def view(self, a: int, b: int) -> np.ndarray:
        """Samples ``[a, b)``; they must still be retained."""
        if a < self.start or b > self.end or a > b:
            raise AssertionError(f"samples [{a}, {b}) outside the retained [{self.start}, {self.end})")
        return self._data[a - self.start : b - self.start]

    def drop_before(self, a: int, keep_capacity: int) -> None:
        """Forget samples before ``a``; shrink the array if a big push left it oversized."""
        k = min(max(0, a - self.start), self._len)
        if k:
            self._data[: self._len - k] = self._data[k : self._len]
            self._len -= k
            self.start += k
        if self._data.size > 2 * max(keep_capacity, self._len):
            self._data = self._data[: max(keep_capacity, self._len)].copy()

    def clear(self) -> None:
        self.start, self._len, self._data = self.end, 0, np.zeros(0, dtype=np.float32)


class StreamingEncoderSession:
    """One audio stream's incremental log-mel and window bookkeeping (see the module docstring)."""

    def __init__(self, encoder_cfg: EncoderConfig, subsample_factor: int = 5) -> None:
        encoder_cfg.validate()
        if not encoder_cfg.center:
            raise ValueError(
                "Streaming reproduces the centred (reflect-padded) STFT; config has center=False."
            )
        if subsample_factor < 1:
            raise ValueError(f"subsample_factor must be at least 1, got {subsample_factor}.")
        self.cfg = encoder_cfg
        self.subsample_factor = subsample_factor
        self._hop = encoder_cfg.hop_length
        self._half = encoder_cfg.n_fft // 2  # context each side of a frame centre
        self._win_frames = encoder_cfg.target_length  # 1008
        self._patch_frames = encoder_cfg.patch_frames  # 4
        self._win_patches = encoder_cfg.window_patches  # 252
        self._samples_per_patch = encoder_cfg.samples_per_patch  # 640
        # Same window, filterbank and power computation as the offline frontend; only the
        # padding differs (done here, on real samples where the offline clip has them).
        self._stft = LogMelFrontend(dataclasses.replace(encoder_cfg, center=False))
        self._buf = _SampleBuffer()
        self._received = 0  # real samples pushed (the finish() zero padding not counted)
        self._finished = False
        self._closed = 0  # windows closed; window self._closed is the open one
        self._max_db: torch.Tensor | None = None  # running max log-mel over final frames
        self._pending: dict[int, WindowJob] = {}  # closed windows whose features are not in yet
        self._ready: dict[int, torch.Tensor | None] = {}  # features in, waiting for earlier windows
        self._next_window = 0  # every window before it has been turned into final tokens
        self._carry: torch.Tensor | None = None  # (< k, D) patches waiting for the next window
        self._final_tokens = 0
        self._open_revision = 0  # revision the open window's next computation gets
        self._tentative: WindowJob | None = None  # the open window as computed at _tentative_at
        self._tentative_at = -1
        self._tentative_done = -1  # highest completed tentative revision of the open window

    # --- state ------------------------------------------------------------------------------

    @property
    def samples_received(self) -> int:
        return self._received

    @property
    def seconds_received(self) -> float:
        return self._received / self.cfg.sample_rate

    @property
    def final_tokens(self) -> int:
        """Final tokens emitted so far (the next final token's index)."""
        return self._final_tokens

    @property
    def closed_windows(self) -> int:
        return self._closed

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def done(self) -> bool:
        """``finish()`` was called and every final token has been emitted."""
        return self._finished and self._next_window == self._closed

    @property
    def pending_jobs(self) -> int:
        """Closed windows whose features have not been completed yet (the caller's backlog)."""
        return len(self._pending)

    @property
    def retained_samples(self) -> int:
        """Samples held in memory (< 10.08 s + 512 after every push)."""
        return len(self._buf)

    # --- input ------------------------------------------------------------------------------

    def push(self, samples: np.ndarray) -> None:
        """Append float32 mono 16 kHz samples (any count, also 0); closes every window it can."""
        if self._finished:
            raise ValueError("push() after finish(): the stream has ended.")
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected mono 1-D samples, got shape {x.shape}")
        if x.size == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError("audio holds NaN or infinite samples")
        self._buf.append(x)
        self._received += x.size
        while self._buf.end >= self._closes_at(self._closed):
            self._close_window()

    def finish(self) -> None:
        """End of stream: the open window (and any frame beyond it) closes with reflect padding at
        the end, as offline. Streams shorter than 0.2 s are zero-padded to 3200 samples first.
        Calling it again does nothing."""
        if self._finished:
            return
        self._finished = True
        self._tentative = None
        n = self._buf.end
        if n == 0:
            return
        if n < MIN_SAMPLES:
            self._buf.append(np.zeros(MIN_SAMPLES - n, dtype=np.float32))
            n = MIN_SAMPLES
        first = self._closed
        f0 = first * self._win_frames
        mel = self._floor(self._mel_db(f0, 1 + n // self._hop, end=n), commit=True)
        # At most the open window plus one frame of the next (which makes no patch).
        for w, start in enumerate(range(0, mel.shape[1], self._win_frames), start=first):
            part = mel[:, start : start + self._win_frames]
            if part.shape[1] // self._patch_frames:
                self._pending[w] = WindowJob(
                    window_index=w,
                    mel=part.clone(),
                    valid_patches=self._valid_patches(w, n),
                    final=True,
                    revision=self._open_revision if w == first else 0,
                )
            else:
                self._ready[w] = None  # no patch: nothing to encode
            self._closed = w + 1
        self._buf.clear()
        self._skip_empty()

    # --- work -------------------------------------------------------------------------------

    def jobs(self, tentative: bool = True) -> list[WindowJob]:
        """Encoder forwards to run now, in the order to complete them.

        Every closed window whose features have not been completed (``final=True``; offered again
        until completed, so a failed run loses nothing), then, with ``tentative`` and while the open
        window holds at least one patch of audio, the open window as it stands (``final=False``).
        A tentative job is recomputed only when audio arrived since the last one and is not offered
        again once completed.
        """
        out = [self._pending[w] for w in sorted(self._pending)]
        if tentative and not self._finished:
            job = self._tentative_job()
            if job is not None:
                out.append(job)
        return out

    def complete(
        self, job: WindowJob, features: torch.Tensor, projector: AudioProjector
    ) -> list[TokenUpdate]:
        """Take ``features`` ((P, D) encoder output of ``job``, P = T // 4) and project tokens.

        Returns the new final tokens (each emitted once, in order; empty while an earlier window's
        job is still outstanding) and, for a tentative job, the tentative tail: from the first
        non-final token to the last full group of 5 patches. Stale jobs (a tentative job of a window
        that has closed since, an older revision, a job completed twice) return ``[]``.
        """
        patches = job.mel.shape[1] // self._patch_frames
        if features.dim() != 2 or features.shape[0] != patches:
            raise ValueError(
                f"features of shape {tuple(features.shape)} for a job of {patches} patches; "
                "expected (patches, dim)"
            )
        with torch.inference_mode():
            if job.final:
                return self._complete_final(job, features, projector)
            return self._complete_tentative(job, features, projector)

    # --- internals --------------------------------------------------------------------------

    def _closes_at(self, j: int) -> int:
        """Samples needed to close window j: its last frame's right context, all real."""
        return self._hop * (self._win_frames * (j + 1) - 1) + self._half

    def _valid_patches(self, w: int, n: int) -> int:
        return max(0, min(n // self._samples_per_patch - self._win_patches * w, self._win_patches))

    def _mel_db(self, f0: int, f1: int, end: int | None) -> torch.Tensor:
        """Unfloored log-mel (n_mels, f1 - f0) of frames [f0, f1).

        Context is real samples; reflect padding at the stream start, and at sample ``end`` when
        given (the stream ends there, as it would offline).
        """
        a = self._hop * f0 - self._half
        b = self._hop * (f1 - 1) + self._half
        lo, hi = max(a, 0), b if end is None else min(b, end)
        seg = self._buf.view(lo, hi)
        left, right = lo - a, b - hi
        seg = np.pad(seg, (left, right), mode="reflect") if left or right else seg.copy()
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            power = self._stft.power_mel(torch.from_numpy(seg))
            db = 10.0 * torch.log10(torch.clamp(power, min=AMIN))
        if db.shape[1] != f1 - f0:
            raise AssertionError(f"computed {db.shape[1]} frames, expected {f1 - f0}")
        return db

    def _floor(self, db: torch.Tensor, commit: bool) -> torch.Tensor:
        """Clamp to (running max incl. these frames) - 120 dB; ``commit`` makes the frames final."""
        peak = db.amax()
        running = peak if self._max_db is None else torch.maximum(self._max_db, peak)
        if commit:
            self._max_db = running
        return torch.maximum(db, running - TOP_DB)

    def _close_window(self) -> None:
        j = self._closed
        f0 = j * self._win_frames
        mel = self._floor(self._mel_db(f0, f0 + self._win_frames, end=None), commit=True)
        self._pending[j] = WindowJob(
            window_index=j,
            mel=mel,
            valid_patches=self._valid_patches(j, self._buf.end),
            final=True,
            revision=self._open_revision,
        )
        self._closed = j + 1
        self._open_revision = 0
        self._tentative, self._tentative_at, self._tentative_done = None, -1, -1
        # The next window's first frame reads from 256 samples before its start.
        self._buf.drop_before(
            self._hop * self._win_frames * self._closed - self._half, self._closes_at(0) + 512
        )

    def _tentative_job(self) -> WindowJob | None:
        j, n = self._closed, self._buf.end
        valid = self._valid_patches(j, n)
        if valid < 1:
            return None
        if self._tentative is None or self._tentative_at != n:
            f0 = j * self._win_frames
            # Frames of the clip truncated at n; at most one lies past this window (no patch),
            # it only counts for the running max, as offline.
            mel = self._floor(self._mel_db(f0, 1 + n // self._hop, end=n), commit=False)
            self._tentative = WindowJob(
                window_index=j,
                mel=mel[:, : self._win_frames].clone(),
                valid_patches=valid,
                final=False,
                revision=self._open_revision,
            )
            self._open_revision += 1
            self._tentative_at = n
        if self._tentative.revision <= self._tentative_done:
            return None
        return self._tentative

    def _complete_final(
        self, job: WindowJob, features: torch.Tensor, projector: AudioProjector
    ) -> list[TokenUpdate]:
        pending = self._pending.get(job.window_index)
        if pending is None or pending.revision != job.revision:
            return []  # unknown or already completed: at-least-once delivery is idempotent
        del self._pending[job.window_index]
        self._ready[job.window_index] = features
        start = self._final_tokens
        groups: list[torch.Tensor] = []
        k = self.subsample_factor
        while self._next_window in self._ready:
            feats = self._ready.pop(self._next_window)
            self._next_window += 1
            if feats is None:
                continue
            x = feats if self._carry is None else torch.cat([self._carry, feats.to(self._carry)])
            n = x.shape[0] // k
            if n:
                groups.append(x[: n * k])
            self._carry = x[n * k :].clone() if x.shape[0] > n * k else None
        self._skip_empty()
        if not groups:
            return []
        tokens = self._project(torch.cat(groups), projector)
        self._final_tokens += tokens.shape[0]
        return [TokenUpdate(start, tokens, True, job.revision, self.seconds_received)]

    def _complete_tentative(
        self, job: WindowJob, features: torch.Tensor, projector: AudioProjector
    ) -> list[TokenUpdate]:
        if (
            self._finished
            or job.window_index != self._closed
            or job.revision <= self._tentative_done
            or self._next_window != job.window_index  # an earlier window's features are not in yet
        ):
            return []
        self._tentative_done = job.revision
        x = features if self._carry is None else torch.cat([self._carry, features.to(self._carry)])
        n = x.shape[0] // self.subsample_factor
        if not n:
            return []
        tokens = self._project(x[: n * self.subsample_factor], projector)
        return [TokenUpdate(self._final_tokens, tokens, False, job.revision, self.seconds_received)]

    def _skip_empty(self) -> None:
        """Pass windows without patches; once the stream is done, drop the trailing patches."""
        while self._ready.get(self._next_window, 0) is None:
            del self._ready[self._next_window]
            self._next_window += 1
        if self.done:
            self._carry = None  # patches_total % k trailing patches, dropped as offline

    def _project(self, patches: torch.Tensor, projector: AudioProjector) -> torch.Tensor:
        weight = next(projector.parameters())
        x = patches.to(device=weight.device, dtype=weight.dtype).unsqueeze(0)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=weight.device)
        tokens, _ = projector(x, mask)
        return tokens[0]


def run_jobs(encoder: DashengEncoder, jobs: Sequence[EncoderWindow]) -> list[torch.Tensor]:
    """Run windows (from any sessions) through ``encoder``; returns each window's (P, D) features.

    Jobs are batched: mels are padded along time to the longest with their own minimum value and
    keys are masked beyond ``valid_patches``, so every job gets the features it gets alone. A job
    with no valid patch (the offline model lets its window attend to everything, padding included)
    runs alone so its padding is the offline one. The encoder must be in eval mode.
    """
    if not jobs:
        return []
    cfg = encoder.cfg
    for job in jobs:
        if not 0 < job.mel.shape[1] <= cfg.target_length or job.mel.shape[0] != cfg.n_mels:
            raise ValueError(
                f"window job mel of shape {tuple(job.mel.shape)} does not fit one encoder window"
            )
    device = next(encoder.parameters()).device
    batched = [i for i, job in enumerate(jobs) if job.valid_patches > 0]
    groups = [batched] if batched else []
    groups += [[i] for i, job in enumerate(jobs) if job.valid_patches <= 0]
    out: list[torch.Tensor | None] = [None] * len(jobs)
    with torch.inference_mode():
        for group in groups:
            width = max(jobs[i].mel.shape[1] for i in group)
            mels = [jobs[i].mel.float() for i in group]
            mel = torch.stack([F.pad(m, (0, width - m.shape[1]), value=float(m.min())) for m in mels]).to(
                device
            )
            lengths = torch.tensor([jobs[i].valid_patches for i in group], dtype=torch.long, device=device)
            feats, _ = encoder.encode_patches(mel, lengths)
            for row, i in enumerate(group):
                out[i] = feats[row, : jobs[i].mel.shape[1] // cfg.patch_frames]
    return [f for f in out if f is not None]
