from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    VALIDATING: _ClassVar[JobStatus]
    QUEUED: _ClassVar[JobStatus]
    RUNNING: _ClassVar[JobStatus]
    SUCCEEDED: _ClassVar[JobStatus]
    FAILED: _ClassVar[JobStatus]
    CANCELLED: _ClassVar[JobStatus]

class TrainingMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_METHOD_UNSPECIFIED: _ClassVar[TrainingMethod]
    LORA: _ClassVar[TrainingMethod]
    FULL: _ClassVar[TrainingMethod]
JOB_STATUS_UNSPECIFIED: JobStatus
VALIDATING: JobStatus
QUEUED: JobStatus
RUNNING: JobStatus
SUCCEEDED: JobStatus
FAILED: JobStatus
CANCELLED: JobStatus
TRAINING_METHOD_UNSPECIFIED: TrainingMethod
LORA: TrainingMethod
FULL: TrainingMethod

class Hyperparameters(_message.Message):
    __slots__ = ("learning_rate", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_steps", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "eval_every", "checkpoint_every")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    epochs: int
    max_steps: int
    batch_size: int
    grad_accum: int
    warmup_steps: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    eval_every: int
    checkpoint_every: int
    def __init__(self, learning_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., grad_accum: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_targets: _Optional[_Iterable[str]] = ..., eval_every: _Optional[int] = ..., checkpoint_every: _Optional[int] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message", "row")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    row: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., row: _Optional[int] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("name", "dataset_uri", "eval_dataset_uri", "base_model", "method", "hyperparameters", "seed", "num_gpus", "adapter_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset_uri: str
    eval_dataset_uri: str
    base_model: str
    method: TrainingMethod
    hyperparameters: Hyperparameters
    seed: int
    num_gpus: int
    adapter_name: str
    def __init__(self, name: _Optional[str] = ..., dataset_uri: _Optional[str] = ..., eval_dataset_uri: _Optional[str] = ..., base_model: _Optional[str] = ..., method: _Optional[_Union[TrainingMethod, str]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., seed: _Optional[int] = ..., num_gpus: _Optional[int] = ..., adapter_name: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "name", "status", "request", "created_at_unix_seconds", "started_at_unix_seconds", "finished_at_unix_seconds", "step", "total_steps", "loss", "error", "problems", "adapter_name", "latest_checkpoint_path")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    LATEST_CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    status: JobStatus
    request: CreateJobRequest
    created_at_unix_seconds: float
    started_at_unix_seconds: float
    finished_at_unix_seconds: float
    step: int
    total_steps: int
    loss: float
    error: JobError
    problems: _containers.RepeatedCompositeFieldContainer[JobError]
    adapter_name: str
    latest_checkpoint_path: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., request: _Optional[_Union[CreateJobRequest, _Mapping]] = ..., created_at_unix_seconds: _Optional[float] = ..., started_at_unix_seconds: _Optional[float] = ..., finished_at_unix_seconds: _Optional[float] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., problems: _Optional[_Iterable[_Union[JobError, _Mapping]]] = ..., adapter_name: _Optional[str] = ..., latest_checkpoint_path: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "statuses")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    statuses: _containers.RepeatedScalarFieldContainer[JobStatus]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[JobStatus, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobEventsRequest(_message.Message):
    __slots__ = ("job_id", "after_event_id", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_event_id: int
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., after_event_id: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "event_id", "kind", "status", "step", "total_steps", "loss", "learning_rate", "eval_scores", "eta_seconds", "checkpoint_path", "message", "created_at_unix_seconds")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[JobEvent.Kind]
        STATUS: _ClassVar[JobEvent.Kind]
        METRICS: _ClassVar[JobEvent.Kind]
        EVAL: _ClassVar[JobEvent.Kind]
        CHECKPOINT: _ClassVar[JobEvent.Kind]
        LOG: _ClassVar[JobEvent.Kind]
    KIND_UNSPECIFIED: JobEvent.Kind
    STATUS: JobEvent.Kind
    METRICS: JobEvent.Kind
    EVAL: JobEvent.Kind
    CHECKPOINT: JobEvent.Kind
    LOG: JobEvent.Kind
    class EvalScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EVAL_SCORES_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    event_id: int
    kind: JobEvent.Kind
    status: JobStatus
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    eval_scores: _containers.ScalarMap[str, float]
    eta_seconds: float
    checkpoint_path: str
    message: str
    created_at_unix_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., event_id: _Optional[int] = ..., kind: _Optional[_Union[JobEvent.Kind, str]] = ..., status: _Optional[_Union[JobStatus, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., eval_scores: _Optional[_Mapping[str, float]] = ..., eta_seconds: _Optional[float] = ..., checkpoint_path: _Optional[str] = ..., message: _Optional[str] = ..., created_at_unix_seconds: _Optional[float] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "base_model", "path", "metrics", "job_id", "created_at_unix_seconds", "lora_rank")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: str
    path: str
    metrics: _containers.ScalarMap[str, float]
    job_id: str
    created_at_unix_seconds: float
    lora_rank: int
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[str] = ..., path: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., job_id: _Optional[str] = ..., created_at_unix_seconds: _Optional[float] = ..., lora_rank: _Optional[int] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "base_model")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    base_model: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., base_model: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
