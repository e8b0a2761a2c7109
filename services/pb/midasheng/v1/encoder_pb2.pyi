from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SampleFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_FORMAT_UNSPECIFIED: _ClassVar[SampleFormat]
    SAMPLE_FORMAT_INT16: _ClassVar[SampleFormat]
    SAMPLE_FORMAT_FLOAT32: _ClassVar[SampleFormat]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
SAMPLE_FORMAT_UNSPECIFIED: SampleFormat
SAMPLE_FORMAT_INT16: SampleFormat
SAMPLE_FORMAT_FLOAT32: SampleFormat
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "emit_interval_seconds", "reattach_only")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EMIT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REATTACH_ONLY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    emit_interval_seconds: float
    reattach_only: bool
    def __init__(self, session_id: _Optional[str] = ..., emit_interval_seconds: _Optional[float] = ..., reattach_only: _Optional[bool] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "sample_rate_hz", "token_rate_hz", "hidden_size", "window_seconds", "last_seq", "reattached")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    REATTACHED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sample_rate_hz: int
    token_rate_hz: float
    hidden_size: int
    window_seconds: float
    last_seq: int
    reattached: bool
    def __init__(self, session_id: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ..., token_rate_hz: _Optional[float] = ..., hidden_size: _Optional[int] = ..., window_seconds: _Optional[float] = ..., last_seq: _Optional[int] = ..., reattached: _Optional[bool] = ...) -> None: ...

class PushAudioRequest(_message.Message):
    __slots__ = ("session_id", "seq", "format", "data", "end_of_stream", "first_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    format: SampleFormat
    data: bytes
    end_of_stream: bool
    first_seq: int
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., format: _Optional[_Union[SampleFormat, str]] = ..., data: _Optional[bytes] = ..., end_of_stream: _Optional[bool] = ..., first_seq: _Optional[int] = ...) -> None: ...

class PushAudioResponse(_message.Message):
    __slots__ = ("seq", "duplicate", "final_tokens", "tentative_tokens", "stream_time_seconds")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    FINAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TENTATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STREAM_TIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    duplicate: bool
    final_tokens: int
    tentative_tokens: int
    stream_time_seconds: float
    def __init__(self, seq: _Optional[int] = ..., duplicate: _Optional[bool] = ..., final_tokens: _Optional[int] = ..., tentative_tokens: _Optional[int] = ..., stream_time_seconds: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "flush")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    flush: bool
    def __init__(self, session_id: _Optional[str] = ..., flush: _Optional[bool] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("final_tokens", "audio_seconds")
    FINAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    final_tokens: int
    audio_seconds: float
    def __init__(self, final_tokens: _Optional[int] = ..., audio_seconds: _Optional[float] = ...) -> None: ...

class EncodeClipRequest(_message.Message):
    __slots__ = ("format", "data", "encoder_only", "dtype")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ONLY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    format: SampleFormat
    data: bytes
    encoder_only: bool
    dtype: DType
    def __init__(self, format: _Optional[_Union[SampleFormat, str]] = ..., data: _Optional[bytes] = ..., encoder_only: _Optional[bool] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class EncodeClipResponse(_message.Message):
    __slots__ = ("embeddings", "audio_seconds", "encode_ms")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    audio_seconds: float
    encode_ms: float
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., audio_seconds: _Optional[float] = ..., encode_ms: _Optional[float] = ...) -> None: ...

class AudioTokens(_message.Message):
    __slots__ = ("session_id", "seq", "window_index", "revision", "token_start", "num_tokens", "hidden_size", "dtype", "data", "num_final", "stream_time_end_seconds", "audio_seq", "end_of_stream", "tentative_start")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WINDOW_INDEX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NUM_FINAL_FIELD_NUMBER: _ClassVar[int]
    STREAM_TIME_END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SEQ_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    TENTATIVE_START_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    window_index: int
    revision: int
    token_start: int
    num_tokens: int
    hidden_size: int
    dtype: DType
    data: bytes
    num_final: int
    stream_time_end_seconds: float
    audio_seq: int
    end_of_stream: bool
    tentative_start: int
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., window_index: _Optional[int] = ..., revision: _Optional[int] = ..., token_start: _Optional[int] = ..., num_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., num_final: _Optional[int] = ..., stream_time_end_seconds: _Optional[float] = ..., audio_seq: _Optional[int] = ..., end_of_stream: _Optional[bool] = ..., tentative_start: _Optional[int] = ...) -> None: ...
