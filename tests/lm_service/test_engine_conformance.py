"""What every caption engine must do (docs/extending.md), checked on the demo model.

Each engine in ENGINES is compared with captioning every window alone on the reference engine:
greedy tokens must not depend on what else shares a batch."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import wait

import numpy as np
import pytest
import torch

from lm_service.engines import ENGINES, make_engine
from lm_service.engines.base import CaptionEngine, CaptionRequest, FinishReason, caption_all
from services.constants import SAMPLE_RATE
from services.errors import InvalidArgument, NotFound
from services.model.generation import GenerationOptions
from services.model.loading import load_pretrained

TIMEOUT_S = 120.0


@pytest.fixture(scope="module", params=ENGINES)
def any_engine(request: pytest.FixtureRequest) -> Iterator[CaptionEngine]:
    e = make_engine(request.param, load_pretrained(None, "cpu"))
    yield e
    e.close()


def windows(engine: CaptionEngine, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Audio-token windows of the demo model from real synthetic audio (what the encoder makes)."""
    from services.training.synth import make_clip

    rng = np.random.default_rng(seed)
    clips = [torch.from_numpy(make_clip(rng).samples[: SAMPLE_RATE * (2 + i % 5)]) for i in range(n)]
    return engine.encode_audio(clips)


def test_batched_equals_alone(any_engine: CaptionEngine, engine: CaptionEngine) -> None:
    ws = windows(any_engine, 6)
    prompts = ["Caption the audio.", "What do you hear?"]
    reqs = [
        CaptionRequest(w, prompts[i % 2], GenerationOptions(max_new_tokens=12 + 4 * (i % 3)))
        for i, w in enumerate(ws)
    ]
    together = caption_all(any_engine, reqs, TIMEOUT_S)
    for r, got in zip(reqs, together, strict=True):
        (alone,) = caption_all(engine, [r], TIMEOUT_S)  # the reference, one window at a time
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.finish_reason is alone.finish_reason
        if got.finish_reason is FinishReason.LENGTH:
            assert len(got.token_ids) == r.options.max_new_tokens
        assert got.prompt_tokens > r.audio_tokens.shape[0]


def test_bad_requests_are_refused_at_submit(any_engine: CaptionEngine) -> None:
    h = any_engine.hidden_size
    for bad in (torch.zeros(0, h), torch.zeros(3, h + 1), torch.zeros(3)):
        with pytest.raises(InvalidArgument):
            any_engine.submit([CaptionRequest(bad)])


def test_an_unknown_adapter_fails_only_its_own_request(any_engine: CaptionEngine) -> None:
    (w,) = windows(any_engine, 1)
    good, bad = any_engine.submit([CaptionRequest(w), CaptionRequest(w, adapter="no-such-adapter")])
    assert good.result(TIMEOUT_S).text
    with pytest.raises(NotFound):
        bad.result(TIMEOUT_S)
    with pytest.raises(NotFound):
        any_engine.check_adapter("no-such-adapter")


def test_cancelled_requests_never_complete_and_the_rest_do(any_engine: CaptionEngine) -> None:
    ws = windows(any_engine, 4, seed=1)
    futures = any_engine.submit(
        [CaptionRequest(w, options=GenerationOptions(max_new_tokens=30)) for w in ws * 4]
    )
    cancelled = [f for f in futures[::3] if f.cancel()]
    done, not_done = wait(futures, timeout=TIMEOUT_S)
    assert not not_done
    assert all(f.cancelled() for f in cancelled)
    assert all(f.result().text for f in futures if not f.cancelled())


def test_stats_count_the_work(any_engine: CaptionEngine) -> None:
    before = any_engine.stats()
    (w,) = windows(any_engine, 1, seed=2)
    (res,) = caption_all(any_engine, [CaptionRequest(w)], TIMEOUT_S)
    after = any_engine.stats()
    assert after.requests == before.requests + 1
    assert after.generated_tokens == before.generated_tokens + len(res.token_ids)
    assert after.prompt_tokens - before.prompt_tokens == res.prompt_tokens


def test_offline_encoding_matches_the_model(any_engine: CaptionEngine) -> None:
    loaded = load_pretrained(None, "cpu")
    clip = torch.randn(SAMPLE_RATE * 3) * 0.1
    (tokens,) = any_engine.encode_audio([clip])
    with torch.inference_mode():
        ref, _ = loaded.model.encode_audio(clip[None], torch.tensor([clip.numel()]))
    assert tokens.shape == (loaded.model.token_count(clip.numel()), loaded.model.config.hidden_size)
    torch.testing.assert_close(tokens, ref[0, : tokens.shape[0]])
