from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from services.training.tokenizer import (
    CHATML_TEMPLATE,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    incremental_decode,
    special_token_ids,
    train_caption_tokenizer,
    train_tokenizer,
)

CAPTIONS = [
    "A dog barks loudly while a car passes by.",
    "Rain falls steadily on a tin roof.",
    "A man speaks, followed by applause from a crowd.",
    "Birds chirp in the distance as wind blows.",
    "A woman laughs and a baby cries.",
    "Music plays with a strong bass beat.",
    "An engine idles, then accelerates away.",
    "Water runs from a tap into a sink.",
    "城市街道上的交通噪音和汽车喇叭声。",
    "Un café animé — des voix et de la vaisselle.",
]
PROMPTS = ["Caption the audio.", "Describe what you hear."]

CHATML_TEXT = (
    "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>\n"
    "<|im_start|>assistant\nA dog barks.<|im_end|>\n"
)

ROUND_TRIP_TEXTS = [
    "hello world",
    "  leading spaces and trailing   ",
    "\nnewlines\n\n\tand tabs\r\n",
    "Punctuation: a , b . c ! d ? (e) [f] {g} 'h' \"i\" -- ... ;:",
    "café — 音频",
    "纯中文的音频描述，没有在语料中出现过。",
    "emoji 🐶🔊🎵 and ZWJ 👩‍👩‍👧 sequences",
    "mixed 123 4.56 1e-3 #tags @at $5 ~ ^ `code`",
    "text with <|fake|> tokens and <|im_start user",
    " ",
    "",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_caption_tokenizer(CAPTIONS * 5, PROMPTS, vocab_size=400)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_caption_tokenizer(CAPTIONS * 5, PROMPTS, vocab_size=400, out_dir=out)
    return out


def test_is_fast_tokenizer(tok: PreTrainedTokenizerFast) -> None:
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.is_fast


def test_special_ids_are_first_in_documented_order(tok: PreTrainedTokenizerFast) -> None:
    assert SPECIAL_TOKENS == (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|audio_bos|>",
        "<|AUDIO|>",
        "<|audio_eos|>",
    )
    ids = special_token_ids(tok)
    assert list(ids) == list(SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(len(SPECIAL_TOKENS)))
    for token, i in ids.items():
        assert tok.convert_tokens_to_ids(token) == i
        assert tok.convert_ids_to_tokens(i) == token


def test_special_ids_independent_of_corpus_and_vocab_size() -> None:
    other = train_tokenizer(["completely different text " * 3, "xyz"], vocab_size=MIN_VOCAB_SIZE + 3)
    assert list(special_token_ids(other).values()) == list(range(len(SPECIAL_TOKENS)))


def test_special_token_ids_missing_raises() -> None:
    class Fake:
        def get_vocab(self) -> dict[str, int]:
            return {"<|endoftext|>": 0}

    with pytest.raises(KeyError):
        special_token_ids(Fake())  # type: ignore[arg-type]


def test_each_special_token_is_one_id_in_chatml(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(CHATML_TEXT, add_special_tokens=False)
    sid = special_token_ids(tok)
    expected_counts = {
        "<|endoftext|>": 0,
        "<|im_start|>": 2,
        "<|im_end|>": 2,
        "<|audio_bos|>": 1,
        "<|AUDIO|>": 1,
        "<|audio_eos|>": 1,
    }
    for token, count in expected_counts.items():
        assert ids.count(sid[token]) == count, token
    # No special token leaks as pieces (e.g. "<|" merges).
    pieces = tok.convert_ids_to_tokens(ids)
    assert not any("<|" in p and p not in SPECIAL_TOKENS for p in pieces)
    assert ids[0] == sid["<|im_start|>"]
    assert ids[ids.index(sid["<|audio_bos|>"]) : ids.index(sid["<|audio_eos|>"]) + 1] == [
        sid["<|audio_bos|>"],
        sid["<|AUDIO|>"],
        sid["<|audio_eos|>"],
    ]
    assert tok.decode(ids) == CHATML_TEXT


def test_encode_adds_no_tokens(tok: PreTrainedTokenizerFast) -> None:
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)


def test_repeated_audio_placeholders(tok: PreTrainedTokenizerFast) -> None:
    text = "<|audio_bos|>" + "<|AUDIO|>" * 7 + "<|audio_eos|>"
    assert tok.encode(text) == [3] + [4] * 7 + [5]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_prompts_and_roles_are_few_tokens(tok: PreTrainedTokenizerFast) -> None:
    for role in ("system", "user", "assistant"):
        assert len(tok.encode(role)) == 1, role
    assert len(tok.encode("\n")) == 1
    for prompt in PROMPTS:
        assert len(tok.encode(prompt)) <= len(prompt.split()) + 1, prompt


def test_skip_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(CHATML_TEXT)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == "user\nCaption the audio.\nassistant\nA dog barks.\n"
    assert not any(t in decoded for t in SPECIAL_TOKENS)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)


def test_pad_eos_padding_side(tok: PreTrainedTokenizerFast) -> None:
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id == 0
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == 2
    assert tok.padding_side == "left"
    assert tok.model_max_length == 4096
    assert tok.clean_up_tokenization_spaces is False
    batch = tok(["a dog", "a dog barks loudly while rain falls"], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long)
    assert short[0] == tok.pad_token_id  # left padding
    assert batch["attention_mask"][0][0] == 0
    assert batch["attention_mask"][0][-1] == 1


def test_chat_template_matches_handwritten_chatml(tok: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio."},
        {"role": "assistant", "content": "A dog barks."},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>\n"
        "<|im_start|>assistant\nA dog barks.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    assert tok.chat_template == CHATML_TEMPLATE


def test_save_and_auto_tokenizer_load(tok: PreTrainedTokenizerFast, saved_dir: Path) -> None:
    assert (saved_dir / "tokenizer.json").is_file()
    assert (saved_dir / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(saved_dir))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.is_fast
    for text in [CHATML_TEXT, *ROUND_TRIP_TEXTS]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert special_token_ids(loaded) == special_token_ids(tok)
    assert loaded.pad_token == "<|endoftext|>"
    assert loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "left"
    assert loaded.model_max_length == 4096
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert loaded.decode(loaded.encode(CHATML_TEXT), skip_special_tokens=True) == tok.decode(
        tok.encode(CHATML_TEXT), skip_special_tokens=True
    )


def test_deterministic_training(tmp_path: Path, saved_dir: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train_caption_tokenizer(CAPTIONS * 5, PROMPTS, vocab_size=400, out_dir=a)
    train_caption_tokenizer(CAPTIONS * 5, PROMPTS, vocab_size=400, out_dir=b)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (saved_dir / "tokenizer.json").read_bytes()
    x = train_tokenizer(CAPTIONS, vocab_size=300)
    y = train_tokenizer(iter(CAPTIONS), vocab_size=300)
    assert json.loads(x.backend_tokenizer.to_str()) == json.loads(y.backend_tokenizer.to_str())


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 300, 512])
def test_vocab_size_respected(vocab_size: int) -> None:
    corpus = CAPTIONS * 20 + [f"word{i} token{i * 7} thing{i % 13}" for i in range(300)]
    t = train_caption_tokenizer(corpus, PROMPTS, vocab_size=vocab_size)
    assert len(t) <= vocab_size
    assert len(t) >= MIN_VOCAB_SIZE
    assert t.decode(t.encode("café — 音频")) == "café — 音频"


def test_vocab_size_too_small_rejected() -> None:
    with pytest.raises(ValueError):
        train_tokenizer(CAPTIONS, vocab_size=MIN_VOCAB_SIZE - 1)


def test_training_corpus_special_tokens_not_learned() -> None:
    t = train_tokenizer([CHATML_TEXT] * 20, vocab_size=400)
    vocab = t.get_vocab()
    assert not any("<|" in p or "|>" in p for p in vocab if p not in SPECIAL_TOKENS)


@pytest.mark.parametrize("text", ["城市街道上的交通噪音。", "音频 café 🐶🎵 done", "👩‍👩‍👧"])
def test_incremental_decode_prefix_property(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text)
    # Byte-level BPE: some prefixes end inside a multi-byte character and decode to U+FFFD, so a streaming
    # detokenizer must hold those back; the full prefix always decodes to the full text.
    assert tok.decode(ids[: len(ids)]) == text
    prefixes = [str(tok.decode(ids[:k])) for k in range(len(ids) + 1)]
    held_back = [p for p in prefixes if p.endswith("\ufffd")]
    assert held_back, "expected at least one partial UTF-8 prefix for non-ASCII text"
    # Naive diff-concatenation that skips partial prefixes yields the full text once complete.
    out, emitted = [], ""
    for p in prefixes:
        if p.endswith("\ufffd"):
            continue
        assert p.startswith(emitted)
        out.append(p[len(emitted) :])
        emitted = p
    assert "".join(out) == text
    pieces = list(incremental_decode(tok, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decode_skip_special(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(CHATML_TEXT + "音频")
    assert "".join(incremental_decode(tok, ids)) == CHATML_TEXT + "音频"
    assert "".join(incremental_decode(tok, ids, skip_special_tokens=True)) == tok.decode(
        ids, skip_special_tokens=True
    )
    assert list(incremental_decode(tok, [])) == []
