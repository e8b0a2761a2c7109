"""Dasheng encoder windowing, padding invariance and the 5x projector."""

from __future__ import annotations

import pytest
import torch

from services.model.modeling import AudioProjector, MiDashengLM
from tests.model.utils import batch_audio, make_wave

WIN_FRAMES = 1008  # 10.08 s of mel frames = 252 patches


def frames_for(patches: int) -> torch.Tensor:
    """A valid-frame count that makes exactly ``patches`` patches valid: (frames - 1) // 4."""
    return torch.tensor([4 * patches + 1])


@pytest.fixture(scope="module")
def long_mel(tiny_model: MiDashengLM) -> tuple[torch.Tensor, torch.Tensor]:
    audio, lengths = batch_audio([make_wave(30.0, seed=11)])
    assert audio.shape == (1, 480_000)
    mel, frames = tiny_model.audio_encoder.front_end(audio, lengths)
    return mel, frames


def test_30s_is_750_frames_in_windows_252_252_246(
    tiny_model: MiDashengLM, long_mel: tuple[torch.Tensor, torch.Tensor]
) -> None:
    enc = tiny_model.audio_encoder
    mel, frames = long_mel
    assert mel.shape == (1, 64, 3001) and frames.tolist() == [3001]
    with torch.inference_mode():
        full, mask = enc(mel, frames)
        assert full.shape == (1, 750, 64) and mask.shape == (1, 750) and bool(mask.all())
        starts, sizes = [0, 252, 504], [252, 252, 246]
        for start, size in zip(starts, sizes, strict=True):
            window = mel[:, :, start * 4 : start * 4 + WIN_FRAMES]
            out, wmask = enc(window, frames_for(size))
            assert out.shape == (1, size, 64) and bool(wmask.all())
            torch.testing.assert_close(full[:, start : start + size], out, atol=1e-5, rtol=0)
    assert sizes == [252, 252, 246] and sum(sizes) == 750


def test_windows_do_not_see_each_other_and_positions_restart(
    tiny_model: MiDashengLM, long_mel: tuple[torch.Tensor, torch.Tensor]
) -> None:
    enc = tiny_model.audio_encoder
    mel, frames = long_mel
    swapped = torch.cat(
        [mel[..., WIN_FRAMES : 2 * WIN_FRAMES], mel[..., :WIN_FRAMES], mel[..., 2 * WIN_FRAMES :]], dim=-1
    )
    with torch.inference_mode():
        a, _ = enc(mel, frames)
        b, _ = enc(swapped, frames)
    torch.testing.assert_close(b[:, :252], a[:, 252:504], atol=1e-5, rtol=0)
    torch.testing.assert_close(b[:, 252:504], a[:, :252], atol=1e-5, rtol=0)
    torch.testing.assert_close(b[:, 504:], a[:, 504:], atol=1e-5, rtol=0)
    # Control: the two windows differ, so the swap test is not vacuous.
    assert (a[:, :252] - a[:, 252:504]).abs().max() > 1e-2


def test_padded_batch_equals_each_item_alone(tiny_model: MiDashengLM) -> None:
    clips = [make_wave(3.1, seed=1), make_wave(11.0, seed=2), make_wave(25.0, seed=3)]
    audio, lengths = batch_audio(clips)
    counts = [tiny_model.token_count(len(c)) for c in clips]
    assert counts == [15, 55, 125]
    with torch.inference_mode():
        feats, fmask = tiny_model.audio_encoder.forward_audio(audio, lengths)
        emb, mask = tiny_model.encode_audio(audio, lengths)
        assert emb.shape == (3, 125, 64) and mask.shape == (3, 125)
        for i, c in enumerate(clips):
            a_audio, a_len = batch_audio([c])
            a_feats, a_fmask = tiny_model.audio_encoder.forward_audio(a_audio, a_len)
            a_emb, a_mask = tiny_model.encode_audio(a_audio, a_len)
            p = a_feats.shape[1]
            assert torch.equal(fmask[i, :p], a_fmask[0]) and not bool(fmask[i, p:].any())
            v = a_fmask[0]
            torch.testing.assert_close(feats[i, :p][v], a_feats[0][v], atol=1e-5, rtol=0)
            n = counts[i]
            assert a_emb.shape[1] == n and bool(a_mask.all())
            assert torch.equal(mask[i, :n], a_mask[0])
            torch.testing.assert_close(emb[i, :n], a_emb[0], atol=1e-5, rtol=0)
            # Past the item's trailing partial group nothing is valid.
            assert not bool(mask[i, n + 1 :].any())


def test_fully_padded_window_gives_no_nan(tiny_model: MiDashengLM) -> None:
    clips = [make_wave(0.3, seed=4), make_wave(25.0, seed=5), make_wave(10.2, seed=6)]
    audio, lengths = batch_audio(clips)
    with torch.inference_mode():
        feats, fmask = tiny_model.audio_encoder.forward_audio(audio, lengths)
        emb, mask = tiny_model.encode_audio(audio, lengths)
    # Item 0 has two windows (10.08 s each) that hold no audio at all.
    assert not bool(fmask[0, 252:].any())
    assert torch.isfinite(feats).all() and torch.isfinite(emb).all()
    assert mask.sum(dim=1).tolist()[1] == 125


def test_projector_drops_trailing_frames_and_stacks_frame_major() -> None:
    torch.manual_seed(1)
    proj = AudioProjector(in_dim=8, out_dim=6, k=5).eval()
    x = torch.randn(2, 23, 8)
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[0, :11] = True  # frames 0..10 valid: groups 0, 1 full, group 2 has one valid frame
    mask[1, 19:] = True  # only frame 19 (last of group 3) and dropped frames 20..22
    with torch.no_grad():
        out, omask = proj(x, mask)
        assert out.shape == (2, 4, 6)
        stacked = torch.stack(
            [torch.cat([x[:, 5 * j + i] for i in range(5)], dim=-1) for j in range(4)], dim=1
        )
        torch.testing.assert_close(out, proj.net(stacked), atol=1e-6, rtol=0)
        y = x.clone()
        y[:, 20:] = 1e3  # trailing T % 5 frames must not matter
        out2, _ = proj(y, mask)
    assert torch.equal(out, out2)
    assert omask.tolist() == [[True, True, True, False], [False, False, False, True]]


def test_projector_shapes_for_the_real_width() -> None:
    proj = AudioProjector(in_dim=1280, out_dim=16, k=5)
    out, m = proj(torch.zeros(1, 754, 1280), torch.ones(1, 754, dtype=torch.bool))
    assert proj.net[0].weight.shape == (16, 6400)
    assert out.shape == (1, 150, 16) and m.shape == (1, 150)
