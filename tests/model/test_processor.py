"""Prompt template, placeholder expansion, padding, labels and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from services.errors import InvalidArgument
from services.model.config import MiDashengLMConfig
from services.model.modeling import num_audio_tokens
from services.model.processor import IGNORE_INDEX, MiDashengProcessor, build_prompt
from tests.model.utils import SR, make_wave

SYSTEM = "You are a helpful language and speech assistant."


def reference_count(num_samples: int) -> int:
    """MODEL_REFERENCE.md: int(1 + ((n + 512) - 512) / 160) // 4 // 5, with audio padded to 3200."""
    n = max(num_samples, 3200)
    return int(1 + ((n + 512) - 512) / 160) // 4 // 5


def ids_of(processor: MiDashengProcessor, *tokens: str) -> list[int]:
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in tokens]


@pytest.mark.parametrize(
    "samples,expected",
    [
        (10 * SR, 50),
        (30 * SR, 150),
        (60 * SR, 300),
        (SR // 10, 1),
        (SR // 5, 1),
        (3199, 1),
        (6399, 2),
        (6400, 2),
    ],
)
def test_placeholder_count(processor: MiDashengProcessor, samples: int, expected: int) -> None:
    assert num_audio_tokens(max(samples, 3200)) == expected == reference_count(samples)
    assert processor.token_count(max(samples, 3200)) == expected
    audio = np.zeros(samples, np.float32)
    inp = processor([build_prompt()], [audio])
    bos, tok, eos = ids_of(processor, "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
    ids = inp.input_ids[0].tolist()
    assert ids.count(tok) == expected
    start = ids.index(bos)
    assert ids[start : start + expected + 2] == [bos] + [tok] * expected + [eos]
    assert ids.count(bos) == ids.count(eos) == 1
    assert inp.audio_token_counts.tolist() == [expected]
    assert inp.audio_lengths.tolist() == [max(samples, 3200)]


def test_counts_follow_the_reference_formula_over_a_range() -> None:
    for n in range(3200, 40_000, 97):
        assert num_audio_tokens(n) == reference_count(n), n


def test_build_prompt_matches_chatml_template() -> None:
    q = "Caption the audio."
    with_system = (
        "<|im_start|>system\nYou are a helpful language and speech assistant.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt(q, SYSTEM) == with_system
    assert build_prompt(q) == without
    assert build_prompt() == without
    assert build_prompt("Transcribe the speech into text <|en|>") == without.replace(
        q, "Transcribe the speech into text <|en|>"
    )


def test_text_left_padded_audio_right_padded(processor: MiDashengProcessor) -> None:
    short, long = make_wave(1.0, seed=1), make_wave(3.0, seed=2)
    inp = processor([build_prompt(), build_prompt(system_prompt=SYSTEM)], [short, long])
    assert inp.audio_token_counts.tolist() == [5, 15]
    alone = [processor([build_prompt()], [short]), processor([build_prompt(system_prompt=SYSTEM)], [long])]
    lens = [a.input_ids.shape[1] for a in alone]
    width = inp.input_ids.shape[1]
    assert width == max(lens) and lens[0] < lens[1]
    pad = width - lens[0]
    assert inp.input_ids[0, :pad].tolist() == [processor.pad_id] * pad == [0] * pad
    assert inp.attention_mask[0].tolist() == [0] * pad + [1] * lens[0]
    assert torch.equal(inp.input_ids[0, pad:], alone[0].input_ids[0])
    assert torch.equal(inp.input_ids[1], alone[1].input_ids[0]) and bool(inp.attention_mask[1].all())
    # Every row ends with the assistant header (the last position is real text).
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row in inp.input_ids.tolist():
        assert row[-len(header) :] == header
    # Audio: right-padded with zeros, lengths in samples.
    assert inp.audio.shape == (2, 48_000) and inp.audio.dtype == torch.float32
    assert inp.audio_lengths.tolist() == [16_000, 48_000]
    assert torch.equal(inp.audio[0, :16_000], torch.from_numpy(short))
    assert not bool(inp.audio[0, 16_000:].any())
    assert torch.equal(inp.audio[1], torch.from_numpy(long))
    assert inp.labels is None


def test_several_audios_in_one_prompt_in_order(processor: MiDashengProcessor) -> None:
    text = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|> and <|audio_bos|><|AUDIO|><|audio_eos|>?<|im_end|>\n"
    inp = processor([text, build_prompt()], [make_wave(1.0, 1), make_wave(2.0, 2), make_wave(0.4, 3)])
    assert inp.audio_token_counts.tolist() == [5, 10, 2]
    _, tok, eos = ids_of(processor, "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
    row = inp.input_ids[0].tolist()
    first = row.index(eos)
    assert row[first - 5 : first] == [tok] * 5 and row[first - 6] != tok
    assert row.count(tok) == 15
    assert inp.input_ids[1].tolist().count(tok) == 2


def test_mismatched_spans_and_audios(processor: MiDashengProcessor) -> None:
    with pytest.raises(InvalidArgument, match=r"2 audio spans .* but 1 audios"):
        processor([build_prompt()] * 2, [make_wave(1.0, 1)])
    with pytest.raises(InvalidArgument, match=r"1 audio spans .* but 2 audios"):
        processor([build_prompt()], [make_wave(1.0, 1), make_wave(1.0, 2)])
    with pytest.raises(InvalidArgument, match=r"0 audio spans"):
        processor(["<|im_start|>user\nhello<|im_end|>\n"], [make_wave(1.0, 1)])


@pytest.mark.parametrize(
    "text",
    [
        "<|im_start|>user\n<|audio_bos|><|AUDIO|>Caption the audio.<|im_end|>\n",
        "<|im_start|>user\n<|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>\n",
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|audio_eos|>Caption the audio.<|im_end|>\n",
    ],
)
def test_unbalanced_span_is_rejected(processor: MiDashengProcessor, text: str) -> None:
    with pytest.raises(InvalidArgument, match="Unbalanced audio span"):
        processor([text], [make_wave(1.0, 1)])


def test_placeholder_outside_its_span_is_rejected(processor: MiDashengProcessor) -> None:
    text = "<|im_start|>user\n<|audio_bos|><|audio_eos|><|AUDIO|>Caption the audio.<|im_end|>\n"
    with pytest.raises(InvalidArgument):
        processor([text], [make_wave(1.0, 1)])


@pytest.mark.parametrize(
    "audio,message",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.0, np.nan, 0.1] * 2000, np.float32), "NaN"),
        (np.array([0.0, np.inf] * 3000, np.float32), "infinite"),
        (np.zeros((2, 16000), np.float32), "mono"),
    ],
)
def test_bad_audio_is_rejected(processor: MiDashengProcessor, audio: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        processor([build_prompt()], [audio])


def test_labels_cover_only_the_answer_and_im_end(processor: MiDashengProcessor) -> None:
    answers = ["A steady low tone.", "Pink noise, then silence."]
    prompts = [build_prompt(), build_prompt(system_prompt=SYSTEM)]
    inp = processor(prompts, [make_wave(1.0, 1), make_wave(2.0, 2)], answers)
    assert inp.labels is not None and inp.labels.shape == inp.input_ids.shape
    im_end = processor.im_end_id
    for i, answer in enumerate(answers):
        reply = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [im_end]
        labels = inp.labels[i].tolist()
        n = len(reply)
        assert labels[-n:] == reply
        assert labels[:-n] == [IGNORE_INDEX] * (len(labels) - n)
        assert inp.input_ids[i, -n:].tolist() == reply
        # The prompt part equals the inference-time prompt.
        prompt_only = processor([prompts[i]], [make_wave(1.0 + i, 1 + i)]).input_ids[0].tolist()
        valid = inp.input_ids[i][inp.attention_mask[i].bool()].tolist()
        assert valid == prompt_only + reply
    assert (
        processor.tokenizer.decode(inp.labels[0][inp.labels[0] != IGNORE_INDEX].tolist())
        == answers[0] + "<|im_end|>"
    )
    with pytest.raises(InvalidArgument, match="answers"):
        processor(prompts, [make_wave(1.0, 1), make_wave(2.0, 2)], answers[:1])


def test_processor_rejects_a_tokenizer_config_mismatch(
    tokenizer: PreTrainedTokenizerFast, tiny_cfg: MiDashengLMConfig
) -> None:
    import dataclasses

    with pytest.raises(InvalidArgument, match="audio_token_id"):
        MiDashengProcessor(tokenizer, dataclasses.replace(tiny_cfg, audio_token_id=7))


def test_stop_ids_hold_im_end(processor: MiDashengProcessor) -> None:
    assert processor.im_end_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert processor.im_end_id in processor.stop_ids()
