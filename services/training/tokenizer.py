"""Small byte-level BPE tokenizer for the tiny demo model.

The real MiDashengLM checkpoint (``mispeech/midashenglm-7b``) ships the Qwen2.5 tokenizer.  The tiny demo
model trained in this repository needs its own small vocabulary, but it is saved in the same on-disk layout
(``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``) so the same loading code
(``transformers.AutoTokenizer.from_pretrained(dir)``) works for both.

Differences from Qwen2.5 worth knowing:

* The special tokens get the *first* ids (0..5, in :data:`SPECIAL_TOKENS` order) rather than ids after the
  base vocabulary, so their ids are stable whatever corpus or ``vocab_size`` the BPE was trained with.
* The pre-tokenizer is the plain GPT-2 byte-level one (``ByteLevel(add_prefix_space=False)``) instead of
  Qwen's split regex; the chat format (ChatML) and the byte-level decoding are the same.

transformers 5 notes: the loaded class is ``transformers.TokenizersBackend`` (``PreTrainedTokenizerFast`` is
an alias of it), ``save_pretrained`` writes the chat template to ``chat_template.jinja`` (not into
``tokenizer_config.json``) and no longer writes ``special_tokens_map.json``; the extra special tokens are
stored as ``extra_special_tokens`` in ``tokenizer_config.json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "AUDIO_BOS_TOKEN",
    "AUDIO_EOS_TOKEN",
    "AUDIO_TOKEN",
    "CHATML_TEMPLATE",
    "CHAT_ROLES",
    "ENDOFTEXT_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "MIN_VOCAB_SIZE",
    "MODEL_MAX_LENGTH",
    "SPECIAL_TOKENS",
    "incremental_decode",
    "special_token_ids",
    "train_caption_tokenizer",
    "train_tokenizer",
]

ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
AUDIO_BOS_TOKEN = "<|audio_bos|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"

#: Special tokens; they get ids ``0..len(SPECIAL_TOKENS)-1`` in exactly this order.
#: ``<|endoftext|>`` (id 0) is the pad token, ``<|im_end|>`` the eos token of chat turns.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    AUDIO_BOS_TOKEN,
    AUDIO_TOKEN,
    AUDIO_EOS_TOKEN,
)

#: ChatML roles that occur in prompts.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")

MODEL_MAX_LENGTH = 4096

#: 256 byte-level symbols plus the special tokens are always in the vocabulary.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

#: ChatML template equivalent to Qwen2's (without Qwen's default system message or tool handling):
#: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, ``<|im_start|>assistant\n`` for generation.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPECIAL_SPLIT_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Map each entry of :data:`SPECIAL_TOKENS` to its id in ``tokenizer``.

    Works for any tokenizer that knows these tokens (also the real Qwen2.5 one, whose ids differ).
    Raises ``KeyError`` if one of them is not in the vocabulary.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise KeyError(f"tokenizer lacks special tokens: {missing}")
    return {t: int(vocab[t]) for t in SPECIAL_TOKENS}


def _strip_special(texts: Iterable[str]) -> Iterator[str]:
    """Yield the pieces of each text between special tokens.

    The BPE trainer does not know the special tokens yet while it counts words, so ``<|im_start|>`` in the
    corpus would otherwise be learned as ``<|``, ``im``, ``_start`` ... merges that waste vocabulary.
    """
    for text in texts:
        for piece in _SPECIAL_SPLIT_RE.split(text):
            if piece:
                yield piece


def _build_backend(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Same as Qwen2: keeps offsets pointing at the original characters, adds no tokens.
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_strip_special(texts), trainer=trainer)
    return backend


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    out_dir: Path | str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer.

    The special tokens get ids 0..5 (see :data:`SPECIAL_TOKENS`), are never split and are dropped by
    ``decode(..., skip_special_tokens=True)``.  ``eos_token`` is ``<|im_end|>``, ``pad_token``
    ``<|endoftext|>``, padding is on the left, ``model_max_length`` is 4096 and the chat template is ChatML.
    Any text round-trips exactly through ``decode(encode(text))`` (byte-level, no unknown token, no
    whitespace clean-up).  Training is deterministic for the same corpus and ``vocab_size``.

    ``vocab_size`` counts the special tokens and the 256 byte symbols, so it must be at least
    :data:`MIN_VOCAB_SIZE`; the result may be smaller when the corpus has too few merges to learn.
    If ``out_dir`` is given the tokenizer is saved there with ``save_pretrained``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}")
    backend = _build_backend(texts, vocab_size)
    for i, token in enumerate(SPECIAL_TOKENS):
        got = backend.token_to_id(token)
        if got != i:  # pragma: no cover - guards against a tokenizers behaviour change
            raise RuntimeError(f"special token {token!r} got id {got}, expected {i}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END_TOKEN, ENDOFTEXT_TOKEN)],
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out))
    return tokenizer


def _caption_corpus(captions: Iterable[str], prompts: Sequence[str]) -> Iterator[str]:
    """Render the training samples roughly as the model sees them (special tokens left out).

    Each caption is paired with a prompt (round robin) in ChatML order with all three role headers, so
    role words, newlines and the prompts are counted (at least) as often as they occur in real training
    sequences and win their merges early.
    """
    headers = "".join(f"{role}\n" for role in CHAT_ROLES)
    for prompt in prompts or [""]:
        yield f"{headers}{prompt}\n"
    for i, caption in enumerate(captions):
        prompt = prompts[i % len(prompts)] if prompts else ""
        yield f"{headers}{prompt}\n{caption}\n"


def train_caption_tokenizer(
    captions: Iterable[str],
    prompts: Iterable[str],
    vocab_size: int = 512,
    out_dir: Path | str | None = None,
) -> PreTrainedTokenizerFast:
    """Like :func:`train_tokenizer`, on captions plus ChatML role words, newlines and ``prompts``.

    Prompts are counted once per caption (as in real training data), so frequent prompts and the role
    headers come out as few tokens.
    """
    return train_tokenizer(_caption_corpus(captions, list(prompts)), vocab_size=vocab_size, out_dir=out_dir)


def incremental_decode(
    tokenizer: PreTrainedTokenizerFast,
    ids: Iterable[int],
    skip_special_tokens: bool = False,
) -> Iterator[str]:
    """Yield text pieces as ids arrive; their concatenation equals ``tokenizer.decode(all_ids)``.

    A byte-level token can end in the middle of a multi-byte UTF-8 character (CJK, emoji); the partial
    character decodes to U+FFFD.  Such text is held back until the next id completes it.  Whatever is
    still pending at the end is flushed (so truly invalid bytes come out as U+FFFD, like ``decode``).
    Decodes the full prefix on each step: O(n^2), fine for caption-length outputs.
    """
    seen: list[int] = []
    emitted = ""
    text = ""
    for token_id in ids:
        seen.append(int(token_id))
        decoded = tokenizer.decode(seen, skip_special_tokens=skip_special_tokens)
        text = decoded if isinstance(decoded, str) else "".join(decoded)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue
        piece, emitted = text[len(emitted) :], text
        if piece:
            yield piece
    if seen and text != emitted:
        if text.startswith(emitted):
            yield text[len(emitted) :]
        else:  # pragma: no cover - decode of a longer prefix rewrote emitted text (not byte-level BPE)
            raise RuntimeError("decoded prefix changed; cannot stream without retraction")
