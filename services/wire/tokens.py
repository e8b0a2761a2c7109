"""AudioTokens (de)serialisation: the payload the encoder publishes and the LM workers read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.errors import InvalidArgument
from services.pb.midasheng.v1 import encoder_pb2

_DTYPES = {
    encoder_pb2.DTYPE_FLOAT32: torch.float32,
    encoder_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    encoder_pb2.DTYPE_FLOAT16: torch.float16,
}
PAYLOAD_FIELD = "pb"  # stream entry field holding the serialized AudioTokens


@dataclass(frozen=True)
class TokenMessage:
    """A decoded AudioTokens publication."""

    seq: int
    token_start: int
    tokens: torch.Tensor  # (n, H): num_final final tokens, then the tentative tail
    num_final: int
    stream_seconds: float
    end_of_stream: bool = False
    window_index: int = 0
    revision: int = 0
    audio_seq: int = 0
    tentative_start: int = 0  # stream index of the first tentative token sent; 0 = right after the finals

    @property
    def final_end(self) -> int:
        """Stream index after the last final token (final tokens: [token_start, final_end))."""
        return self.token_start + self.num_final

    @property
    def tentative_at(self) -> int:
        """Stream index of the first tentative token sent (those before it, back to ``final_end``,
        did not change beyond the encoder's tolerance and were not sent again)."""
        return self.tentative_start or self.final_end

    @property
    def total_end(self) -> int:
        """Stream index after the last token (final or tentative) the receiver then holds."""
        return self.tentative_at + int(self.tokens.shape[0]) - self.num_final


def tokens_to_bytes(tokens: torch.Tensor) -> tuple[bytes, int]:
    """(n, H) tensor -> little-endian bytes + proto dtype."""
    t = tokens.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes(), encoder_pb2.DTYPE_BFLOAT16
    if t.dtype == torch.float16:
        return t.numpy().astype("<f2").tobytes(), encoder_pb2.DTYPE_FLOAT16
    return t.float().numpy().astype(np.dtype("<f4")).tobytes(), encoder_pb2.DTYPE_FLOAT32


def encode_tokens(session_id: str, msg: TokenMessage) -> bytes:
    data, dtype = tokens_to_bytes(msg.tokens)
    return encoder_pb2.AudioTokens(
        session_id=session_id,
        seq=msg.seq,
        window_index=msg.window_index,
        revision=msg.revision,
        token_start=msg.token_start,
        num_tokens=int(msg.tokens.shape[0]),
        hidden_size=int(msg.tokens.shape[1]),
        dtype=dtype,  # type: ignore[arg-type]
        data=data,
        num_final=msg.num_final,
        stream_time_end_seconds=msg.stream_seconds,
        audio_seq=msg.audio_seq,
        end_of_stream=msg.end_of_stream,
        tentative_start=msg.tentative_start,
    ).SerializeToString()


def decode_tokens(payload: bytes) -> tuple[str, TokenMessage]:
    """AudioTokens protobuf bytes -> (session id, message). Raises InvalidArgument when malformed."""
    try:
        msg = encoder_pb2.AudioTokens.FromString(payload)
    except Exception as e:  # protobuf raises DecodeError; anything else is just as malformed
        raise InvalidArgument(f"unparseable AudioTokens payload ({e})") from e
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(f"AudioTokens has unknown dtype {msg.dtype}")
    itemsize = torch.tensor([], dtype=dtype).element_size()
    if msg.hidden_size == 0 or len(msg.data) != msg.num_tokens * msg.hidden_size * itemsize:
        raise InvalidArgument(
            f"AudioTokens data holds {len(msg.data)} bytes for {msg.num_tokens} x {msg.hidden_size} tokens"
        )
    if msg.num_final > msg.num_tokens:
        raise InvalidArgument(f"AudioTokens num_final {msg.num_final} exceeds num_tokens {msg.num_tokens}")
    if msg.tentative_start and msg.tentative_start < msg.token_start + msg.num_final:
        raise InvalidArgument(
            f"AudioTokens tentative_start {msg.tentative_start} is before its final tokens' end "
            f"{msg.token_start + msg.num_final}"
        )
    if msg.num_tokens:
        raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
        tokens = raw.view(dtype).reshape(msg.num_tokens, msg.hidden_size).clone()
    else:
        tokens = torch.zeros((0, msg.hidden_size), dtype=dtype)
    return msg.session_id, TokenMessage(
        seq=msg.seq,
        token_start=msg.token_start,
        tokens=tokens,
        num_final=msg.num_final,
        stream_seconds=msg.stream_time_end_seconds,
        end_of_stream=msg.end_of_stream,
        window_index=msg.window_index,
        revision=msg.revision,
        audio_seq=msg.audio_seq,
        tentative_start=msg.tentative_start,
    )
