from services.pb.midasheng.v1 import captions_pb2 as _captions_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ("window_seconds",)
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    window_seconds: float
    def __init__(self, window_seconds: _Optional[float] = ...) -> None: ...

class LMStats(_message.Message):
    __slots__ = ("worker_id", "sessions_leased", "sessions_capacity", "tokens_per_second", "queue_lag_messages", "queue_lag_seconds", "mean_batch_size", "adapters_loaded", "device_memory_used_bytes", "offline_queue_depth")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_LEASED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LAG_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_LOADED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    sessions_leased: int
    sessions_capacity: int
    tokens_per_second: float
    queue_lag_messages: int
    queue_lag_seconds: float
    mean_batch_size: float
    adapters_loaded: _containers.RepeatedScalarFieldContainer[str]
    device_memory_used_bytes: int
    offline_queue_depth: int
    def __init__(self, worker_id: _Optional[str] = ..., sessions_leased: _Optional[int] = ..., sessions_capacity: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., queue_lag_messages: _Optional[int] = ..., queue_lag_seconds: _Optional[float] = ..., mean_batch_size: _Optional[float] = ..., adapters_loaded: _Optional[_Iterable[str]] = ..., device_memory_used_bytes: _Optional[int] = ..., offline_queue_depth: _Optional[int] = ...) -> None: ...
