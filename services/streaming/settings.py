"""Caption settings of a live session, shared by the gateway (writes them) and LM workers (read them)."""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import InvalidArgument

TOKENS_PER_SECOND = 5.0  # one audio token per 200 ms
DEFAULT_WINDOW_SECONDS = 10.0  # the clip length the model was trained on
DEFAULT_HOP_SECONDS = 2.0


@dataclass(frozen=True)
class SessionSettings:
    window_seconds: float = DEFAULT_WINDOW_SECONDS
    hop_seconds: float = DEFAULT_HOP_SECONDS
    prompt: str = "Caption the audio."
    interim_results: bool = True
    max_new_tokens: int = 48
    adapter: str = ""

    def validate(self) -> None:
        if not 1.0 <= self.window_seconds <= 30.0:
            raise InvalidArgument(f"window_seconds must be within [1, 30], got {self.window_seconds}.")
        if not 0.2 <= self.hop_seconds <= self.window_seconds:
            raise InvalidArgument(f"hop_seconds must be within [0.2, window], got {self.hop_seconds}.")
        if not 1 <= self.max_new_tokens <= 256:
            raise InvalidArgument(f"max_new_tokens must be within [1, 256], got {self.max_new_tokens}.")

    @property
    def window_tokens(self) -> int:
        return max(1, round(self.window_seconds * TOKENS_PER_SECOND))


def settings_from_hash(raw: dict[bytes, bytes]) -> SessionSettings:
    get = {k.decode(): v.decode() for k, v in raw.items()}
    s = SessionSettings(
        window_seconds=float(get.get("window_seconds", 10.0)),
        hop_seconds=float(get.get("hop_seconds", 2.0)),
        prompt=get.get("prompt") or "Caption the audio.",
        interim_results=get.get("interim_results", "1") == "1",
        max_new_tokens=int(get.get("max_new_tokens", 48)),
        adapter=get.get("adapter", ""),
    )
    s.validate()
    return s


def settings_to_hash(s: SessionSettings) -> dict[str, str]:
    return {
        "window_seconds": repr(s.window_seconds),
        "hop_seconds": repr(s.hop_seconds),
        "prompt": s.prompt,
        "interim_results": "1" if s.interim_results else "0",
        "max_new_tokens": str(s.max_new_tokens),
        "adapter": s.adapter,
    }
