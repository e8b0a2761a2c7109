"""Prompt building and batching: ChatML text with expanded audio placeholders + padded audio.

Text is left-padded (so every row's last position is real and decoding appends on the right);
waveforms are right-padded with zeros and carry their lengths in samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from services.constants import DEFAULT_PROMPT, SAMPLES_PER_TOKEN
from services.errors import InvalidArgument
from services.model.config import MiDashengLMConfig
from services.model.modeling import num_audio_tokens

AUDIO_BOS = "<|audio_bos|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_EOS = "<|audio_eos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_SPAN = AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS
MIN_SAMPLES = (
    SAMPLES_PER_TOKEN  # 0.2 s: the shortest clip that yields one 5 Hz token; shorter audio is zero-padded
)
IGNORE_INDEX = -100


def build_prompt(question: str = DEFAULT_PROMPT, system_prompt: str | None = None) -> str:
    """ChatML prompt with the audio first, then the question; ends with the assistant header."""
    system = f"{IM_START}system\n{system_prompt}{IM_END}\n" if system_prompt else ""
    return f"{system}{IM_START}user\n{AUDIO_SPAN}{question}{IM_END}\n{IM_START}assistant\n"


@dataclass
class ModelInputs:
    """A batch ready for :class:`MiDashengLM`. Shapes: ids (B, S); audio (A, N); counts (A,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    audio: torch.Tensor
    audio_lengths: torch.Tensor
    audio_token_counts: torch.Tensor
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ModelInputs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return ModelInputs(**{k: (v.to(device) if v is not None else None) for k, v in moved.items()})  # type: ignore[arg-type]


def prepare_audio(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """1-D float waveform at 16 kHz -> fp32 tensor, zero-padded to at least 0.2 s."""
    wav = torch.as_tensor(
        np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio
    ).float()
    if wav.dim() != 1:
        raise InvalidArgument(f"Audio must be mono 1-D samples, got shape {tuple(wav.shape)}.")
    if wav.numel() == 0:
        raise InvalidArgument("Audio is empty.")
    if not torch.isfinite(wav).all():
        raise InvalidArgument("Audio holds NaN or infinite samples.")
    if wav.numel() < MIN_SAMPLES:
        wav = torch.nn.functional.pad(wav, (0, MIN_SAMPLES - wav.numel()))
    return wav


class MiDashengProcessor:
    """Turns (prompt text, audio) pairs into :class:`ModelInputs` with a transformers tokenizer."""

    def __init__(self, tokenizer, config: MiDashengLMConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        enc = config.audio_encoder_config
        self._token_args = (enc.hop_length, enc.patch_frames, config.subsample_factor)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS, IM_START, IM_END) if t not in vocab]
        if missing:
            raise InvalidArgument(f"The tokenizer lacks the special tokens {missing}.")
        if vocab[AUDIO_TOKEN] != config.audio_token_id:
            raise InvalidArgument(
                f"The tokenizer's {AUDIO_TOKEN} id {vocab[AUDIO_TOKEN]} differs from the config's "
                f"audio_token_id {config.audio_token_id}."
            )
        self.im_end_id = int(vocab[IM_END])
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.im_end_id)

    def stop_ids(self) -> list[int]:
        ids = {self.im_end_id}
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    def token_count(self, num_samples: int) -> int:
        return num_audio_tokens(num_samples, *self._token_args)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(
        self,
        texts: Sequence[str],
        audios: Sequence[np.ndarray | torch.Tensor],
        answers: Sequence[str] | None = None,
    ) -> ModelInputs:
        """Batch ``texts`` (each holding audio spans) with ``audios`` in order of appearance.

        With ``answers`` (training), each answer + ``<|im_end|>`` is appended and ``labels``
        hold only those tokens; everything else is ``-100``.
        """
        wavs = [prepare_audio(a) for a in audios]
        counts = [self.token_count(w.numel()) for w in wavs]
        input_ids, attention, labels = self.encode_text(texts, counts, answers)
        n_max = max((w.numel() for w in wavs), default=MIN_SAMPLES)
        audio = torch.zeros((len(wavs), n_max), dtype=torch.float32)
        for i, w in enumerate(wavs):
            audio[i, : w.numel()] = w
        return ModelInputs(
            input_ids=input_ids,
            attention_mask=attention,
            audio=audio,
            audio_lengths=torch.tensor([w.numel() for w in wavs], dtype=torch.long),
            audio_token_counts=torch.tensor(counts, dtype=torch.long),
            labels=labels,
        )

    def encode_text(
        self, texts: Sequence[str], audio_token_counts: Sequence[int], answers: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Left-padded (input_ids, attention_mask, labels) with each audio span expanded to its count.

        The i-th ``<|AUDIO|>`` in reading order gets ``audio_token_counts[i]`` copies.
        """
        spans = [t.count(AUDIO_TOKEN) for t in texts]
        if sum(spans) != len(audio_token_counts):
            raise InvalidArgument(
                f"The text holds {sum(spans)} audio spans ({AUDIO_SPAN}) but {len(audio_token_counts)} audios were given."
            )
        for t in texts:
            if not t.count(AUDIO_BOS) == t.count(AUDIO_EOS) == t.count(AUDIO_TOKEN) == t.count(AUDIO_SPAN):
                raise InvalidArgument(
                    f"Unbalanced audio span in prompt: every {AUDIO_TOKEN} needs {AUDIO_BOS}…{AUDIO_EOS}."
                )
        if answers is not None and len(answers) != len(texts):
            raise InvalidArgument(f"{len(answers)} answers for {len(texts)} prompts.")

        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        k = 0
        for i, text in enumerate(texts):
            pieces = text.split(AUDIO_TOKEN)
            expanded = pieces[0]
            for piece in pieces[1:]:
                expanded += AUDIO_TOKEN * int(audio_token_counts[k]) + piece
                k += 1
            ids = self._encode(expanded)
            labels = [IGNORE_INDEX] * len(ids)
            if answers is not None:
                reply = self._encode(answers[i]) + [self.im_end_id]
                ids, labels = ids + reply, labels + reply
            rows.append(ids)
            label_rows.append(labels)

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, labels) in enumerate(zip(rows, label_rows, strict=True)):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
            label_t[i, width - len(ids) :] = torch.tensor(labels)
        return input_ids, attention, (label_t if answers is not None else None)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()
