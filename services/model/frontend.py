"""Log-mel frontend of the Dasheng encoder, in plain torch (no torchaudio).

STFT (periodic Hann, reflect padding at the clip's ends) -> power -> HTK mel filterbank
(no area normalisation) -> 10*log10 with a 120 dB floor below the item's own maximum.
Always computed in fp32: the filterbank and window are plain tensors, not module buffers,
so casting the model to bf16 never touches them.
"""

from __future__ import annotations

import torch
from torch import nn

from services.model.config import EncoderConfig

AMIN = 1e-10  # power floor before the log
TOP_DB = 120.0  # dB below the item's loudest bin that the log-mel is clamped to


def hz_to_mel_htk(freq: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(freq, dtype=torch.float64) / 700.0)


def mel_to_hz_htk(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-scale filters, shape (n_freqs, n_mels), fp32, peak 1, no normalisation."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(
        float(hz_to_mel_htk(f_min)), float(hz_to_mel_htk(f_max)), n_mels + 2, dtype=torch.float64
    )
    f_pts = mel_to_hz_htk(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).to(torch.float32)


def num_frames(num_samples: int, hop_length: int = 160) -> int:
    """Mel frames of a clip with center padding: 1 + floor(samples / hop)."""
    return 1 + num_samples // hop_length


class LogMelFrontend(nn.Module):
    """(B, N) waveforms + lengths in samples -> (B, n_mels, T) log-mel in dB, fp32."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.n_fft = cfg.n_fft
        self.win_length = cfg.win_length
        self.hop_length = cfg.hop_length
        self.center = cfg.center
        self.n_mels = cfg.n_mels
        # Plain attributes (not buffers): never saved, never cast by .to(dtype), and real CPU
        # tensors even when the model is built on the meta device.
        with torch.device("cpu"):
            self._window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float32)
            self._fb = mel_filterbank(cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _consts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = (self._window.to(device), self._fb.to(device))
        return self._cache[device]

    def power_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(N,) fp32 waveform -> (n_mels, 1 + N // hop) mel power."""
        window, fb = self._consts(wav.device)
        spec = torch.stft(
            wav,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=window,
            center=self.center,
            pad_mode="reflect",
            return_complex=True,
        )  # (n_freqs, T)
        power = spec.real.square() + spec.imag.square()
        return fb.T @ power  # (n_mels, T)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(N,) waveform -> (n_mels, T) dB with the per-item 120 dB floor."""
        with torch.autocast(wav.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            db = 10.0 * torch.log10(torch.clamp(self.power_mel(wav.float()), min=AMIN))
        return torch.maximum(db, db.amax() - TOP_DB)

    def forward(
        self, wav: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (log-mel (B, n_mels, T_max), frames (B,)).

        Each item is transformed on its own valid samples, so a padded batch gives every item
        exactly the features it gets alone (reflect padding at its real end, its own dB floor).
        Frames past an item's end are filled with its floor value.
        """
        if wav.dim() != 2:
            raise ValueError(f"expected (batch, samples) audio, got shape {tuple(wav.shape)}")
        batch = wav.shape[0]
        if lengths is None:
            lengths = torch.full((batch,), wav.shape[1], dtype=torch.long)
        lens = [int(n) for n in lengths.tolist()]
        frames = [num_frames(n, self.hop_length) for n in lens]
        out = wav.new_zeros((batch, self.n_mels, max(frames)), dtype=torch.float32)
        for i, n in enumerate(lens):
            mel = self.log_mel(wav[i, :n])
            out[i, :, : mel.shape[1]] = mel
            out[i, :, mel.shape[1] :] = mel.amin()
        return out, torch.tensor(frames, dtype=torch.long, device=wav.device)
