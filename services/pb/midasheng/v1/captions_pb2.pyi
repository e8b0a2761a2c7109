from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    LINEAR16: _ClassVar[AudioEncoding]
    FLOAT32: _ClassVar[AudioEncoding]

class InterimWindow(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERIM_WINDOW_UNSPECIFIED: _ClassVar[InterimWindow]
    SEGMENT: _ClassVar[InterimWindow]
    SLIDING: _ClassVar[InterimWindow]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
LINEAR16: AudioEncoding
FLOAT32: AudioEncoding
INTERIM_WINDOW_UNSPECIFIED: InterimWindow
SEGMENT: InterimWindow
SLIDING: InterimWindow

class GenerationOptions(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("sample_rate_hz", "encoding", "channels", "prompt", "window_seconds", "hop_seconds", "interim_results", "adapter", "language", "session_id", "resume_after_event_id", "max_new_tokens", "interim_window", "resume_secret", "questions")
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INTERIM_WINDOW_FIELD_NUMBER: _ClassVar[int]
    RESUME_SECRET_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    sample_rate_hz: int
    encoding: AudioEncoding
    channels: int
    prompt: str
    window_seconds: float
    hop_seconds: float
    interim_results: bool
    adapter: str
    language: str
    session_id: str
    resume_after_event_id: str
    max_new_tokens: int
    interim_window: InterimWindow
    resume_secret: str
    questions: _containers.RepeatedCompositeFieldContainer[Question]
    def __init__(self, sample_rate_hz: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., channels: _Optional[int] = ..., prompt: _Optional[str] = ..., window_seconds: _Optional[float] = ..., hop_seconds: _Optional[float] = ..., interim_results: _Optional[bool] = ..., adapter: _Optional[str] = ..., language: _Optional[str] = ..., session_id: _Optional[str] = ..., resume_after_event_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., interim_window: _Optional[_Union[InterimWindow, str]] = ..., resume_secret: _Optional[str] = ..., questions: _Optional[_Iterable[_Union[Question, _Mapping]]] = ...) -> None: ...

class Question(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class SetQuestions(_message.Message):
    __slots__ = ("questions",)
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    questions: _containers.RepeatedCompositeFieldContainer[Question]
    def __init__(self, questions: _Optional[_Iterable[_Union[Question, _Mapping]]] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data", "seq")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    seq: int
    def __init__(self, data: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("action",)
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[Control.Action]
        KEEP_ALIVE: _ClassVar[Control.Action]
        FINALIZE: _ClassVar[Control.Action]
        CLOSE: _ClassVar[Control.Action]
    ACTION_UNSPECIFIED: Control.Action
    KEEP_ALIVE: Control.Action
    FINALIZE: Control.Action
    CLOSE: Control.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: Control.Action
    def __init__(self, action: _Optional[_Union[Control.Action, str]] = ...) -> None: ...

class StreamCaptionsRequest(_message.Message):
    __slots__ = ("config", "audio", "control", "set_questions")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    SET_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    audio: AudioChunk
    control: Control
    set_questions: SetQuestions
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ..., set_questions: _Optional[_Union[SetQuestions, _Mapping]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_chunk_bytes", "max_session_seconds", "max_buffered_seconds", "idle_timeout_seconds", "resume_retention_seconds", "max_prompt_chars", "max_new_tokens", "max_channels", "min_sample_rate_hz", "max_sample_rate_hz")
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BUFFERED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_RETENTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    max_chunk_bytes: int
    max_session_seconds: float
    max_buffered_seconds: float
    idle_timeout_seconds: float
    resume_retention_seconds: float
    max_prompt_chars: int
    max_new_tokens: int
    max_channels: int
    min_sample_rate_hz: int
    max_sample_rate_hz: int
    def __init__(self, max_chunk_bytes: _Optional[int] = ..., max_session_seconds: _Optional[float] = ..., max_buffered_seconds: _Optional[float] = ..., idle_timeout_seconds: _Optional[float] = ..., resume_retention_seconds: _Optional[float] = ..., max_prompt_chars: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_channels: _Optional[int] = ..., min_sample_rate_hz: _Optional[int] = ..., max_sample_rate_hz: _Optional[int] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "effective_config", "limits", "resumed", "last_seq", "resume_secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    RESUME_SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    effective_config: SessionConfig
    limits: ServerLimits
    resumed: bool
    last_seq: int
    resume_secret: str
    def __init__(self, session_id: _Optional[str] = ..., effective_config: _Optional[_Union[SessionConfig, _Mapping]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., resumed: _Optional[bool] = ..., last_seq: _Optional[int] = ..., resume_secret: _Optional[str] = ...) -> None: ...

class CaptionEvent(_message.Message):
    __slots__ = ("event_id", "segment_id", "revision", "window_start_seconds", "window_end_seconds", "text", "is_final", "audio_processed_seconds", "adapter", "question_id", "answer")
    class YesNo(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        YES_NO_UNSPECIFIED: _ClassVar[CaptionEvent.YesNo]
        YES: _ClassVar[CaptionEvent.YesNo]
        NO: _ClassVar[CaptionEvent.YesNo]
    YES_NO_UNSPECIFIED: CaptionEvent.YesNo
    YES: CaptionEvent.YesNo
    NO: CaptionEvent.YesNo
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    segment_id: int
    revision: int
    window_start_seconds: float
    window_end_seconds: float
    text: str
    is_final: bool
    audio_processed_seconds: float
    adapter: str
    question_id: str
    answer: CaptionEvent.YesNo
    def __init__(self, event_id: _Optional[str] = ..., segment_id: _Optional[int] = ..., revision: _Optional[int] = ..., window_start_seconds: _Optional[float] = ..., window_end_seconds: _Optional[float] = ..., text: _Optional[str] = ..., is_final: _Optional[bool] = ..., audio_processed_seconds: _Optional[float] = ..., adapter: _Optional[str] = ..., question_id: _Optional[str] = ..., answer: _Optional[_Union[CaptionEvent.YesNo, str]] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("event_id", "alert_id", "rule_id", "kind", "text", "window_start_seconds", "window_end_seconds", "question_id", "fired_at", "has_clip")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRED_AT_FIELD_NUMBER: _ClassVar[int]
    HAS_CLIP_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    alert_id: str
    rule_id: str
    kind: str
    text: str
    window_start_seconds: float
    window_end_seconds: float
    question_id: str
    fired_at: float
    has_clip: bool
    def __init__(self, event_id: _Optional[str] = ..., alert_id: _Optional[str] = ..., rule_id: _Optional[str] = ..., kind: _Optional[str] = ..., text: _Optional[str] = ..., window_start_seconds: _Optional[float] = ..., window_end_seconds: _Optional[float] = ..., question_id: _Optional[str] = ..., fired_at: _Optional[float] = ..., has_clip: _Optional[bool] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "reason", "fatal")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    fatal: bool
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., fatal: _Optional[bool] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("reason", "total_audio_seconds", "last_event_id")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[SessionEnded.Reason]
        CLIENT_CLOSED: _ClassVar[SessionEnded.Reason]
        IDLE_TIMEOUT: _ClassVar[SessionEnded.Reason]
        MAX_DURATION: _ClassVar[SessionEnded.Reason]
        SERVER_SHUTDOWN: _ClassVar[SessionEnded.Reason]
        ERROR: _ClassVar[SessionEnded.Reason]
    REASON_UNSPECIFIED: SessionEnded.Reason
    CLIENT_CLOSED: SessionEnded.Reason
    IDLE_TIMEOUT: SessionEnded.Reason
    MAX_DURATION: SessionEnded.Reason
    SERVER_SHUTDOWN: SessionEnded.Reason
    ERROR: SessionEnded.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    reason: SessionEnded.Reason
    total_audio_seconds: float
    last_event_id: str
    def __init__(self, reason: _Optional[_Union[SessionEnded.Reason, str]] = ..., total_audio_seconds: _Optional[float] = ..., last_event_id: _Optional[str] = ...) -> None: ...

class StreamCaptionsResponse(_message.Message):
    __slots__ = ("started", "caption", "error", "ended", "alert")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    caption: CaptionEvent
    error: StreamError
    ended: SessionEnded
    alert: AlertEvent
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., caption: _Optional[_Union[CaptionEvent, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ..., alert: _Optional[_Union[AlertEvent, _Mapping]] = ...) -> None: ...

class RawAudio(_message.Message):
    __slots__ = ("data", "sample_rate_hz", "encoding", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sample_rate_hz: int
    encoding: AudioEncoding
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., sample_rate_hz: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., channels: _Optional[int] = ...) -> None: ...

class CaptionRequest(_message.Message):
    __slots__ = ("encoded_audio", "raw_audio", "prompt", "options", "adapter", "request_id")
    ENCODED_AUDIO_FIELD_NUMBER: _ClassVar[int]
    RAW_AUDIO_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    encoded_audio: bytes
    raw_audio: RawAudio
    prompt: str
    options: GenerationOptions
    adapter: str
    request_id: str
    def __init__(self, encoded_audio: _Optional[bytes] = ..., raw_audio: _Optional[_Union[RawAudio, _Mapping]] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., adapter: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "encode_ms", "generate_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    encode_ms: float
    generate_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class CaptionResponse(_message.Message):
    __slots__ = ("text", "audio_seconds", "timings", "request_id", "adapter", "finish_reason", "generated_tokens")
    class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FINISH_REASON_UNSPECIFIED: _ClassVar[CaptionResponse.FinishReason]
        STOP: _ClassVar[CaptionResponse.FinishReason]
        LENGTH: _ClassVar[CaptionResponse.FinishReason]
    FINISH_REASON_UNSPECIFIED: CaptionResponse.FinishReason
    STOP: CaptionResponse.FinishReason
    LENGTH: CaptionResponse.FinishReason
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    audio_seconds: float
    timings: Timings
    request_id: str
    adapter: str
    finish_reason: CaptionResponse.FinishReason
    generated_tokens: int
    def __init__(self, text: _Optional[str] = ..., audio_seconds: _Optional[float] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., adapter: _Optional[str] = ..., finish_reason: _Optional[_Union[CaptionResponse.FinishReason, str]] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class BatchCaptionRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CaptionRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[CaptionRequest, _Mapping]]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BatchCaptionResult(_message.Message):
    __slots__ = ("index", "request_id", "caption", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    request_id: str
    caption: CaptionResponse
    error: ItemError
    def __init__(self, index: _Optional[int] = ..., request_id: _Optional[str] = ..., caption: _Optional[_Union[CaptionResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class BatchCaptionResponse(_message.Message):
    __slots__ = ("results", "total_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchCaptionResult]
    total_ms: float
    def __init__(self, results: _Optional[_Iterable[_Union[BatchCaptionResult, _Mapping]]] = ..., total_ms: _Optional[float] = ...) -> None: ...
