import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChurnLabel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHURN_LABEL_UNSPECIFIED: _ClassVar[ChurnLabel]
    CHURN_LABEL_STAY: _ClassVar[ChurnLabel]
    CHURN_LABEL_CHURN: _ClassVar[ChurnLabel]

class FeatureType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_TYPE_UNSPECIFIED: _ClassVar[FeatureType]
    FEATURE_TYPE_INT64: _ClassVar[FeatureType]
    FEATURE_TYPE_DOUBLE: _ClassVar[FeatureType]
    FEATURE_TYPE_BOOL: _ClassVar[FeatureType]
    FEATURE_TYPE_STRING: _ClassVar[FeatureType]

class Runtime(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNTIME_UNSPECIFIED: _ClassVar[Runtime]
    RUNTIME_SKLEARN: _ClassVar[Runtime]
    RUNTIME_ONNX: _ClassVar[Runtime]
    RUNTIME_FOREST: _ClassVar[Runtime]
CHURN_LABEL_UNSPECIFIED: ChurnLabel
CHURN_LABEL_STAY: ChurnLabel
CHURN_LABEL_CHURN: ChurnLabel
FEATURE_TYPE_UNSPECIFIED: FeatureType
FEATURE_TYPE_INT64: FeatureType
FEATURE_TYPE_DOUBLE: FeatureType
FEATURE_TYPE_BOOL: FeatureType
FEATURE_TYPE_STRING: FeatureType
RUNTIME_UNSPECIFIED: Runtime
RUNTIME_SKLEARN: Runtime
RUNTIME_ONNX: Runtime
RUNTIME_FOREST: Runtime

class PredictRequest(_message.Message):
    __slots__ = ("user_id", "explain")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    explain: bool
    def __init__(self, user_id: _Optional[str] = ..., explain: _Optional[bool] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("prediction",)
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    prediction: Prediction
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ...) -> None: ...

class BatchPredictRequest(_message.Message):
    __slots__ = ("user_ids", "explain")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    explain: bool
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., explain: _Optional[bool] = ...) -> None: ...

class BatchPredictResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchPredictResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchPredictResult, _Mapping]]] = ...) -> None: ...

class BatchPredictResult(_message.Message):
    __slots__ = ("user_id", "prediction", "error")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    prediction: Prediction
    error: _status_pb2.Status
    def __init__(self, user_id: _Optional[str] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model", "stage", "aliases", "run_id", "model_uri", "training_as_of", "feature_service", "features", "metrics", "loaded_at", "runtime", "last_reload_failure", "shadow", "base_value")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    TRAINING_AS_OF_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_FAILURE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    BASE_VALUE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    stage: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    run_id: str
    model_uri: str
    training_as_of: str
    feature_service: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureSchema]
    metrics: _containers.ScalarMap[str, float]
    loaded_at: _timestamp_pb2.Timestamp
    runtime: Runtime
    last_reload_failure: ReloadFailure
    shadow: ShadowReport
    base_value: float
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., stage: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., run_id: _Optional[str] = ..., model_uri: _Optional[str] = ..., training_as_of: _Optional[str] = ..., feature_service: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureSchema, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., runtime: _Optional[_Union[Runtime, str]] = ..., last_reload_failure: _Optional[_Union[ReloadFailure, _Mapping]] = ..., shadow: _Optional[_Union[ShadowReport, _Mapping]] = ..., base_value: _Optional[float] = ...) -> None: ...

class ShadowReport(_message.Message):
    __slots__ = ("model_uri", "model", "sample", "comparisons", "users_dropped", "last_reload_failure")
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    USERS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_FAILURE_FIELD_NUMBER: _ClassVar[int]
    model_uri: str
    model: ModelRef
    sample: float
    comparisons: _containers.RepeatedCompositeFieldContainer[ShadowComparison]
    users_dropped: int
    last_reload_failure: ReloadFailure
    def __init__(self, model_uri: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., sample: _Optional[float] = ..., comparisons: _Optional[_Iterable[_Union[ShadowComparison, _Mapping]]] = ..., users_dropped: _Optional[int] = ..., last_reload_failure: _Optional[_Union[ReloadFailure, _Mapping]] = ...) -> None: ...

class ShadowComparison(_message.Message):
    __slots__ = ("shadow_version", "production_version", "users_compared", "label_agreement", "mean_abs_delta", "p99_abs_delta")
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    USERS_COMPARED_FIELD_NUMBER: _ClassVar[int]
    LABEL_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_DELTA_FIELD_NUMBER: _ClassVar[int]
    P99_ABS_DELTA_FIELD_NUMBER: _ClassVar[int]
    shadow_version: str
    production_version: str
    users_compared: int
    label_agreement: float
    mean_abs_delta: float
    p99_abs_delta: float
    def __init__(self, shadow_version: _Optional[str] = ..., production_version: _Optional[str] = ..., users_compared: _Optional[int] = ..., label_agreement: _Optional[float] = ..., mean_abs_delta: _Optional[float] = ..., p99_abs_delta: _Optional[float] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("user_id", "label", "churn_probability", "model", "features", "contributions")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CHURN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    label: ChurnLabel
    churn_probability: float
    model: ModelRef
    features: _containers.RepeatedCompositeFieldContainer[FeatureValue]
    contributions: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    def __init__(self, user_id: _Optional[str] = ..., label: _Optional[_Union[ChurnLabel, str]] = ..., churn_probability: _Optional[float] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., features: _Optional[_Iterable[_Union[FeatureValue, _Mapping]]] = ..., contributions: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("name", "contribution")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    contribution: float
    def __init__(self, name: _Optional[str] = ..., contribution: _Optional[float] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("name", "int64_value", "double_value", "bool_value", "string_value", "event_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INT64_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    int64_value: int
    double_value: float
    bool_value: bool
    string_value: str
    event_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., int64_value: _Optional[int] = ..., double_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., string_value: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FeatureSchema(_message.Message):
    __slots__ = ("name", "type", "feature_view")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VIEW_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: FeatureType
    feature_view: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[FeatureType, str]] = ..., feature_view: _Optional[str] = ...) -> None: ...

class ReloadFailure(_message.Message):
    __slots__ = ("model_version", "reason", "failed_at")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    reason: str
    failed_at: _timestamp_pb2.Timestamp
    def __init__(self, model_version: _Optional[str] = ..., reason: _Optional[str] = ..., failed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
