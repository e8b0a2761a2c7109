"""The batched engine against the reference (demo model, fp32, greedy: exact token equality).

Shared prefixes, kept stream KV, caption-as-draft and unmerged LoRA are optimisations only: every
caption must equal the reference engine's caption of the same window, asked alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lm_service.engines.base import CaptionRequest, CaptionResult, caption_all
from lm_service.engines.batched import BatchedEngine
from lm_service.engines.limits import EngineLimits
from lm_service.engines.lora import add_lora, load_lora
from lm_service.engines.reference import ReferenceEngine
from services.constants import SAMPLE_RATE
from services.errors import InvalidArgument, NotFound, ResourceExhausted
from services.model.adapters import adapters_in_dir
from services.model.generation import GenerationOptions
from services.model.loading import LoadedModel, load_pretrained
from services.training.synth import make_clip

T = 120.0  # s, the longest wait for a result
OPTS = GenerationOptions(max_new_tokens=24)
QUESTIONS = ["Caption the audio.", "What sound is this?", "Describe the audio in a few words."]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_pretrained(None, "cpu")


@pytest.fixture(scope="module")
def adapters_dir(demo: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two random LoRA adapters on the demo model: decoder-only, and one that also adapts the encoder."""
    root = tmp_path_factory.mktemp("adapters")
    for name, targets, seed in (
        ("dec", ["q_proj", "v_proj", "o_proj", "down_proj"], 1),
        ("all", ["q_proj", "k_proj", "gate_proj", "up_proj", "attn.qkv", "audio_projector.net.0"], 2),
    ):
        model = load_pretrained(None, "cpu").model
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:  # peft starts B at zero: give the adapter an effect
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        peft.save_pretrained(str(root / name))
    return root


@pytest.fixture(scope="module")
def reference(demo: LoadedModel, adapters_dir: Path) -> Iterator[ReferenceEngine]:
    e = ReferenceEngine(demo, adapters=adapters_in_dir(adapters_dir))
    yield e
    e.close()


@pytest.fixture(scope="module")
def batched(demo: LoadedModel, adapters_dir: Path) -> Iterator[BatchedEngine]:
    e = BatchedEngine(demo, EngineLimits(kv_cache_mb=64), adapters=adapters_in_dir(adapters_dir))
    yield e
    e.close()


def tokens_of(engine: ReferenceEngine | BatchedEngine, seconds: float, seed: int) -> torch.Tensor:
    """Audio tokens of a synthetic clip (changing scenes: several clips back to back)."""
    rng = np.random.default_rng(seed)
    pieces = []
    while sum(len(p) for p in pieces) < seconds * SAMPLE_RATE:
        pieces.append(make_clip(rng).samples)
    audio = torch.from_numpy(np.concatenate(pieces)[: int(seconds * SAMPLE_RATE)])
    return engine.encode_audio([audio])[0]


def alone(reference: ReferenceEngine, r: CaptionRequest) -> CaptionResult:
    """The reference caption of the same window, prompt and adapter, with nothing else around."""
    plain = CaptionRequest(r.audio_tokens, r.prompt, r.options, r.adapter, r.system_prompt)
    return caption_all(reference, [plain], T)[0]


def test_mixed_batches_equal_each_request_alone(batched: BatchedEngine, reference: ReferenceEngine) -> None:
    audio = tokens_of(batched, 24.0, seed=3)
    reqs = []
    for i in range(8):
        start = 7 * i
        window = audio[start : start + 10 + 9 * (i % 4)]  # 10..37 tokens
        reqs.append(
            CaptionRequest(
                window,
                QUESTIONS[i % 3],
                GenerationOptions(max_new_tokens=8 + 6 * (i % 3)),
                adapter=["", "dec", "all", "dec"][i % 4],
                system_prompt="You listen carefully." if i == 5 else "",
            )
        )
    got = caption_all(batched, reqs, T)
    for r, res in zip(reqs, got, strict=True):
        ref = alone(reference, r)
        assert res.token_ids == ref.token_ids, (r.adapter, r.prompt)
        assert res.finish_reason is ref.finish_reason
    # The adapters change the captions (so the comparison above says something about them).
    base = caption_all(batched, [CaptionRequest(reqs[1].audio_tokens, reqs[1].prompt, reqs[1].options)], T)[0]
    assert base.token_ids != got[1].token_ids


def test_a_growing_window_reuses_its_kv_and_captions_like_from_scratch(
    batched: BatchedEngine, reference: ReferenceEngine
) -> None:
    """An interim anchored at its segment's start, every hop, with the tentative tail revised."""
    audio = tokens_of(batched, 30.0, seed=4)
    g = torch.Generator().manual_seed(0)
    window, hop = 50, 10
    computed = []
    for end in range(hop, 150 + 1, hop):
        seg = (end - 1) // window
        start = seg * window
        tokens = audio[start:end].clone()
        tentative = min(7, tokens.shape[0])  # the encoder revises the open window's last tokens
        tokens[-tentative:] += 0.05 * torch.randn(tentative, tokens.shape[1], generator=g)
        r = CaptionRequest(
            tokens, options=OPTS, stream="grow", audio_start=start, num_final=tokens.shape[0] - tentative
        )
        (res,) = caption_all(batched, [r], T)
        assert res.token_ids == alone(reference, r).token_ids, end
        computed.append((end - start, res.prompt_tokens, res.computed_prompt_tokens))
    # Within a segment only what changed is prefilled: the revised tail, the new hop, the question.
    prefix = len(batched._prompt(QUESTIONS[0], "").prefix_ids)
    for (n_prev, _, _), (n, prompt, comp) in zip(computed, computed[1:], strict=False):
        if n > n_prev:  # the same segment, grown by a hop: its earlier tokens (bar the revised tail) are kept
            assert comp == prompt - prefix - (n_prev - 7), (n_prev, n, prompt, comp)
        else:  # a new segment: only the shared prompt prefix is kept
            assert comp == prompt - prefix
    batched.end_stream("grow")


def test_sliding_windows_are_correct_without_reuse(
    batched: BatchedEngine, reference: ReferenceEngine
) -> None:
    audio = tokens_of(batched, 20.0, seed=5)
    for end in range(20, 100 + 1, 20):
        start = max(0, end - 50)
        r = CaptionRequest(audio[start:end], options=OPTS, stream="slide", audio_start=start)
        (res,) = caption_all(batched, [r], T)
        assert res.token_ids == alone(reference, r).token_ids
    batched.end_stream("slide")


def test_questions_over_one_window_share_its_audio(
    batched: BatchedEngine, reference: ReferenceEngine
) -> None:
    audio = tokens_of(batched, 10.0, seed=6)
    reqs = [
        CaptionRequest(audio, q, OPTS, stream="qa", audio_start=0, num_final=audio.shape[0])
        for q in QUESTIONS
    ]
    got = caption_all(batched, reqs, T)
    prefix = len(batched._prompt(QUESTIONS[0], "").prefix_ids)
    for r, res in zip(reqs, got, strict=True):
        assert res.token_ids == alone(reference, r).token_ids
    assert got[0].computed_prompt_tokens in (got[0].prompt_tokens, got[0].prompt_tokens - prefix)
    for res in got[1:]:  # only each question's own tokens
        assert res.computed_prompt_tokens == res.prompt_tokens - prefix - audio.shape[0]
    batched.end_stream("qa")


@pytest.mark.parametrize("kind", ["right", "partly", "wrong", "longer", "empty", "previous"])
def test_caption_as_draft_equals_plain_greedy(
    batched: BatchedEngine, reference: ReferenceEngine, kind: str
) -> None:
    audio = tokens_of(batched, 10.0, seed=7)
    plain = CaptionRequest(audio, options=OPTS)
    truth = alone(reference, plain)
    g = list(truth.token_ids)
    assert len(g) >= 4, "a caption long enough to draft"
    stop = min(batched.stop_ids)
    drafts: dict[str, tuple[int, ...] | None] = {
        "right": (*g, stop),
        "partly": (*g[:2], (g[2] + 1) % 300, *g[3:]),
        "wrong": tuple((t + 7) % 300 for t in g),
        "longer": (*g, *g, *g),
        "empty": (),
        "previous": None,  # the stream's previous caption: same window, so all of it agrees
    }
    if kind == "previous":
        caption_all(batched, [CaptionRequest(audio, options=OPTS, stream="draft")], T)
    r = CaptionRequest(audio, options=OPTS, stream="draft" if kind == "previous" else "", draft=drafts[kind])
    (res,) = caption_all(batched, [r], T)
    assert res.token_ids == truth.token_ids and res.finish_reason is truth.finish_reason
    expected_accept = {
        "right": len(g) + 1,
        "partly": 2,
        "wrong": 0,
        "longer": len(g),
        "empty": 0,
        "previous": len(g) + 1,
    }
    assert res.accepted_tokens == min(expected_accept[kind], OPTS.max_new_tokens)
    batched.end_stream("draft")


def test_unmerged_lora_equals_merged_weights(demo: LoadedModel, adapters_dir: Path) -> None:
    """Tolerance of the unmerged update vs merged weights: 1e-5 absolute on fp32 activations."""
    adapter = load_lora("dec", adapters_dir / "dec", torch.device("cpu"), torch.float32)
    layer = demo.model.decoder.model.layers[0].self_attn.q_proj
    a, b, scale = adapter.decoder[(0, "q_proj")]
    x = torch.randn(6, layer.in_features)
    rows = torch.tensor([1, 3, 4])
    with torch.no_grad():
        y = add_lora(layer(x), x, [(adapter, rows)], (0, "q_proj"))
        merged = torch.nn.functional.linear(x, layer.weight + scale * b @ a, layer.bias)
    torch.testing.assert_close(y[rows], merged[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[[0, 2, 5]], layer(x)[[0, 2, 5]], atol=0, rtol=0)  # base rows untouched


def test_offline_encoding_applies_encoder_side_lora(
    batched: BatchedEngine, reference: ReferenceEngine
) -> None:
    clip = torch.from_numpy(make_clip(np.random.default_rng(9)).samples)
    got = batched.encode_audio([clip], adapter="all")[0]
    want = reference.encode_audio([clip], adapter="all")[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, batched.encode_audio([clip])[0])


def test_a_broken_adapter_fails_only_its_requests(
    batched: BatchedEngine, adapters_dir: Path, tmp_path: Path
) -> None:
    audio = tokens_of(batched, 4.0, seed=10)
    broken = adapters_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    futures = batched.submit(
        [CaptionRequest(audio, options=OPTS, adapter=a) for a in ("", "broken", "missing", "dec")]
    )
    assert futures[0].result(T).text and futures[3].result(T).text
    with pytest.raises(InvalidArgument, match="broken"):
        futures[1].result(T)
    with pytest.raises(NotFound, match="missing"):
        futures[2].result(T)


# --- admission, cancellation, memory (stepped by hand: deterministic) ----------------------------


@pytest.fixture
def small(demo: LoadedModel) -> Iterator[BatchedEngine]:
    """An engine with a KV pool of 12 blocks of 16 tokens, stepped by the test."""
    geometry_bytes = 2 * 2 * 2 * 40 * 4  # layers x (k, v) x kv heads x head dim x fp32 of the demo decoder
    limits = EngineLimits(kv_cache_mb=1, block_size=16, max_wait_seconds=3600)
    e = BatchedEngine(demo, limits, run_thread=False)
    assert e.pool.geometry.bytes_per_token == geometry_bytes
    e.pool = type(e.pool)(e.pool.geometry, 12, 16, e.device)  # a pool small enough to fill
    yield e
    e.close()


def run(engine: BatchedEngine, steps: int = 500) -> None:
    for _ in range(steps):
        if not engine.step() and not engine._inbox and not engine._waiting:
            return


def test_requests_wait_for_memory_then_run_and_the_pool_returns_to_zero(small: BatchedEngine) -> None:
    audio = tokens_of(small, 10.0, seed=11)  # 50 tokens: a request needs ~5 blocks with its caption
    futures = small.submit(
        [CaptionRequest(audio, options=OPTS, stream=f"s{i}", audio_start=0) for i in range(5)]
    )
    small.step()
    assert small.stats().waiting >= 2, "the pool holds two requests at a time; the rest wait"
    run(small)
    results = [f.result(0) for f in futures]
    assert len({r.token_ids for r in results}) == 1  # the same window: the same caption
    assert small.pool.used_blocks > 0  # kept stream KV and the shared prefix
    for i in range(5):
        small.end_stream(f"s{i}")
    small.step()
    assert small.pool.used_blocks == 0 and small.stats().kv_used_tokens == 0


def test_a_request_that_can_never_fit_is_refused(small: BatchedEngine) -> None:
    audio = tokens_of(small, 40.0, seed=12)  # 200 tokens > 12 blocks x 16
    (f,) = small.submit([CaptionRequest(audio, options=OPTS)])
    run(small)
    with pytest.raises(ResourceExhausted, match="KV blocks"):
        f.result(0)
    assert small.pool.used_blocks == 0


def test_waiting_too_long_is_refused_with_a_retry_hint(demo: LoadedModel) -> None:
    e = BatchedEngine(demo, EngineLimits(kv_cache_mb=1, max_wait_seconds=0.001), run_thread=False)
    e.pool = type(e.pool)(e.pool.geometry, 6, 16, e.device)
    try:
        audio = tokens_of(e, 10.0, seed=13)
        first, second = e.submit([CaptionRequest(audio, options=OPTS), CaptionRequest(audio, options=OPTS)])
        e.step()  # the first takes the pool
        time.sleep(0.01)
        e.step()
        with pytest.raises(ResourceExhausted, match="retry"):
            second.result(0)
        run(e)
        assert first.result(0).text
    finally:
        e.close()


def test_cancellation_mid_decode_frees_the_sequence(small: BatchedEngine) -> None:
    audio = tokens_of(small, 8.0, seed=14)
    f, other = small.submit([CaptionRequest(audio, options=GenerationOptions(max_new_tokens=40))] * 2)
    for _ in range(50):
        small.step()
        if small._running and all(s.cached >= s.prompt_len for s in small._running):
            break
    assert small._running and small._running[0].generated, "decoding has begun"
    assert f.cancel()
    small.step()
    assert f.cancelled() and len(small._running) <= 1
    run(small)
    assert other.result(0).text
    small.end_stream("")
    small.step()
    assert small.pool.used_blocks == 0


def test_sampling_runs_with_a_seed(batched: BatchedEngine) -> None:
    audio = tokens_of(batched, 6.0, seed=15)
    opts = GenerationOptions(max_new_tokens=12, temperature=0.8, seed=3)
    a, b = caption_all(batched, [CaptionRequest(audio, options=opts)] * 2, T)
    assert a.token_ids == b.token_ids and a.text
