"""Greedy / sampled decoding: cache equivalence, padding invariance, stopping and option checks.

Most tests run the Qwen2-family tiny model; cache equivalence and padding invariance also run the
Qwen3 family (q/k RMSNorm, tied embeddings: MiDashengLM-0.6B's decoder)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from services.errors import InvalidArgument
from services.model.generation import GenerationOptions, generate
from services.model.modeling import MiDashengLM
from services.model.processor import MiDashengProcessor, ModelInputs, build_prompt
from tests.model.utils import make_wave

NEVER: list[int] = []  # no stop ids: every row runs for max_new_tokens


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [make_wave(1.0, seed=1), make_wave(2.7, seed=2), make_wave(4.4, seed=3)]


@pytest.fixture(scope="module")
def batch(processor: MiDashengProcessor, clips: list[np.ndarray]) -> ModelInputs:
    prompts = [build_prompt(), build_prompt("Describe it."), build_prompt(system_prompt="Be brief.")]
    return processor(prompts, clips)


@pytest.fixture(scope="module")
def greedy(tiny_model: MiDashengLM, batch: ModelInputs) -> list[list[int]]:
    return generate(tiny_model, batch, NEVER, GenerationOptions(max_new_tokens=20))


def test_cached_equals_uncached_greedy(
    tiny_model: MiDashengLM, batch: ModelInputs, greedy: list[list[int]]
) -> None:
    assert len(batch.input_ids) == 3 and len(set(batch.attention_mask.sum(1).tolist())) == 3
    uncached = generate(tiny_model, batch, NEVER, GenerationOptions(max_new_tokens=20, use_cache=False))
    assert [len(r) for r in greedy] == [20, 20, 20]
    assert greedy == uncached
    assert len({tuple(r) for r in greedy}) == 3  # rows really differ: the audio matters


@pytest.fixture(scope="module")
def qwen3_batch(qwen3_processor: MiDashengProcessor, clips: list[np.ndarray]) -> ModelInputs:
    prompts = [build_prompt(), build_prompt("Describe it."), build_prompt(system_prompt="Be brief.")]
    return qwen3_processor(prompts, clips)


@pytest.fixture(scope="module")
def qwen3_greedy(tiny_qwen3_model: MiDashengLM, qwen3_batch: ModelInputs) -> list[list[int]]:
    return generate(tiny_qwen3_model, qwen3_batch, NEVER, GenerationOptions(max_new_tokens=20))


def test_qwen3_cached_equals_uncached_greedy(
    tiny_qwen3_model: MiDashengLM, qwen3_batch: ModelInputs, qwen3_greedy: list[list[int]]
) -> None:
    assert len(set(qwen3_batch.attention_mask.sum(1).tolist())) == 3  # three different left pads
    uncached = generate(
        tiny_qwen3_model, qwen3_batch, NEVER, GenerationOptions(max_new_tokens=20, use_cache=False)
    )
    assert [len(r) for r in qwen3_greedy] == [20, 20, 20]
    assert qwen3_greedy == uncached
    assert len({tuple(r) for r in qwen3_greedy}) == 3  # rows really differ: the audio matters
    assert len({t for r in qwen3_greedy for t in r}) >= 5  # not one token over and over


def test_qwen3_left_padded_rows_equal_each_row_alone(
    tiny_qwen3_model: MiDashengLM,
    qwen3_processor: MiDashengProcessor,
    clips: list[np.ndarray],
    qwen3_greedy: list[list[int]],
) -> None:
    prompts = [build_prompt(), build_prompt("Describe it."), build_prompt(system_prompt="Be brief.")]
    for i in range(3):
        alone = qwen3_processor([prompts[i]], [clips[i]])
        assert generate(tiny_qwen3_model, alone, NEVER, GenerationOptions(max_new_tokens=20)) == [
            qwen3_greedy[i]
        ]


def test_left_padded_rows_equal_each_row_alone(
    tiny_model: MiDashengLM, processor: MiDashengProcessor, clips: list[np.ndarray], greedy: list[list[int]]
) -> None:
    prompts = [build_prompt(), build_prompt("Describe it."), build_prompt(system_prompt="Be brief.")]
    for i in range(3):
        alone = processor([prompts[i]], [clips[i]])
        assert generate(tiny_model, alone, NEVER, GenerationOptions(max_new_tokens=20)) == [greedy[i]]


def test_sampling_seeds(tiny_model: MiDashengLM, batch: ModelInputs, greedy: list[list[int]]) -> None:
    def run(temperature: float, seed: int, top_p: float = 1.0) -> list[list[int]]:
        options = GenerationOptions(max_new_tokens=20, temperature=temperature, top_p=top_p, seed=seed)
        return generate(tiny_model, batch, NEVER, options)

    a = run(temperature=1.0, seed=123)
    assert a == run(temperature=1.0, seed=123)
    b = run(temperature=1.0, seed=124)
    assert a != b
    assert sum(x != y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)) >= 10
    assert a != greedy
    assert run(temperature=1e-6, seed=5) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=5) == greedy
    assert run(temperature=2.0, top_p=1e-6, seed=9) == greedy


class Scripted:
    """Forward hook on lm_head: call n makes ``script[row][n]`` the only non-zero logit of each row."""

    def __init__(self, script: Sequence[Sequence[int]]) -> None:
        self.script = script
        self.calls = 0

    def __call__(
        self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        logits = torch.zeros_like(output)
        for row, seq in enumerate(self.script):
            logits[row, -1, seq[min(self.calls, len(seq) - 1)]] = 10.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("use_cache", [True, False])
def test_stops_at_im_end(
    fresh_model: MiDashengLM, processor: MiDashengProcessor, batch: ModelInputs, use_cache: bool
) -> None:
    im_end = processor.im_end_id
    script = [[40, 41, 42, im_end, 43, 44], [50, im_end, 51, 52], [60, 61, 62, 63, 64, im_end]]
    hook = Scripted(script)
    fresh_model.decoder.lm_head.register_forward_hook(hook)
    out = generate(
        fresh_model, batch, processor.stop_ids(), GenerationOptions(max_new_tokens=20, use_cache=use_cache)
    )
    assert out == [[40, 41, 42], [50], [60, 61, 62, 63, 64]]
    assert hook.calls == 6  # prefill + 5 steps: stops as soon as the last row is done


def test_im_end_first_gives_empty_results(
    fresh_model: MiDashengLM, processor: MiDashengProcessor, batch: ModelInputs
) -> None:
    hook = Scripted([[processor.im_end_id]] * 3)
    fresh_model.decoder.lm_head.register_forward_hook(hook)
    assert generate(fresh_model, batch, processor.stop_ids(), GenerationOptions(max_new_tokens=20)) == [
        [],
        [],
        [],
    ]
    assert hook.calls == 1


def test_im_end_wins_through_the_weights(
    fresh_model: MiDashengLM, processor: MiDashengProcessor, batch: ModelInputs
) -> None:
    """Without hooks: an lm_head with a bias that favours <|im_end|> ends every row at once."""
    head = fresh_model.decoder.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.zero_()
        biased.bias.zero_()
        biased.bias[processor.im_end_id] = 1.0
    fresh_model.decoder.lm_head = biased
    assert generate(fresh_model, batch, processor.stop_ids(), GenerationOptions(max_new_tokens=5)) == [
        [],
        [],
        [],
    ]


@pytest.mark.parametrize("n", [1, 7])
def test_max_new_tokens_is_respected(
    tiny_model: MiDashengLM, batch: ModelInputs, greedy: list[list[int]], n: int
) -> None:
    out = generate(tiny_model, batch, NEVER, GenerationOptions(max_new_tokens=n))
    assert [len(r) for r in out] == [n] * 3
    assert out == [r[:n] for r in greedy]


@pytest.mark.parametrize(
    "options,message",
    [
        (GenerationOptions(max_new_tokens=0), "max_new_tokens"),
        (GenerationOptions(max_new_tokens=4097), "max_new_tokens"),
        (GenerationOptions(temperature=-0.1), "temperature"),
        (GenerationOptions(top_p=0.0), "top_p"),
        (GenerationOptions(top_p=1.5), "top_p"),
    ],
)
def test_invalid_options(
    tiny_model: MiDashengLM, batch: ModelInputs, options: GenerationOptions, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        options.validate()
    with pytest.raises(InvalidArgument, match=message):
        generate(tiny_model, batch, NEVER, options)


def test_placeholder_mismatch_is_an_invalid_argument(tiny_model: MiDashengLM, batch: ModelInputs) -> None:
    bad = ModelInputs(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        audio=batch.audio,
        audio_lengths=batch.audio_lengths,
        audio_token_counts=batch.audio_token_counts + 1,
    )
    with pytest.raises(InvalidArgument, match="placeholder"):
        generate(tiny_model, bad, NEVER, GenerationOptions(max_new_tokens=2))
