"""Plain dataclasses for what the PredictionService returns, converted from its protobuf messages.

Callers get Python types (str enums, datetimes, `None` for unset values) and never touch protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message

from streamflow.client.errors import ChurnServiceError, error_from_status
from streamflow.serving.v1 import prediction_service_pb2 as pb


class ChurnLabel(StrEnum):
    """The predicted class of a user."""

    UNSPECIFIED = "unspecified"
    STAY = "stay"
    CHURN = "churn"


class FeatureType(StrEnum):
    """The value type of a feature."""

    UNSPECIFIED = "unspecified"
    INT64 = "int64"
    DOUBLE = "double"
    BOOL = "bool"
    STRING = "string"


class Runtime(StrEnum):
    """The inference engine that scores requests."""

    UNSPECIFIED = "unspecified"
    SKLEARN = "sklearn"
    ONNX = "onnx"
    FOREST = "forest"


FeatureScalar = int | float | bool | str


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, e.g. `streamflow_churn` version `3`."""

    name: str
    version: str


@dataclass(frozen=True)
class FeatureValue:
    """One feature value the model read, with the event time of its snapshot row."""

    name: str
    value: FeatureScalar | None
    event_time: datetime | None


@dataclass(frozen=True)
class FeatureContribution:
    """How much one feature's value moved a prediction from the model's base value (exact TreeSHAP, in
    probability units: positive raises the churn probability)."""

    name: str
    contribution: float


@dataclass(frozen=True)
class Prediction:
    """One user's churn score and everything that produced it."""

    user_id: str
    label: ChurnLabel
    churn_probability: float
    model: ModelRef
    features: tuple[FeatureValue, ...]
    contributions: tuple[FeatureContribution, ...] = ()
    """When asked to `explain`: one per feature, largest magnitude first; `ModelInfo.base_value` plus their
    sum is `churn_probability`."""


@dataclass(frozen=True)
class BatchResult:
    """The outcome for one requested id of a batch: its prediction, or the typed error Predict would raise."""

    user_id: str
    outcome: Prediction | ChurnServiceError


@dataclass(frozen=True)
class FeatureSchema:
    """One feature of the model, its type and the Feast feature view it is read from."""

    name: str
    type: FeatureType
    feature_view: str


@dataclass(frozen=True)
class ReloadFailure:
    """A model version the server refused to serve, and why."""

    model_version: str
    reason: str
    failed_at: datetime | None


@dataclass(frozen=True)
class ModelInfo:
    """The model now answering: registry identity, training snapshot, features, metrics and runtime."""

    model: ModelRef
    stage: str
    aliases: tuple[str, ...]
    run_id: str
    model_uri: str
    training_as_of: str
    feature_service: str
    features: tuple[FeatureSchema, ...]
    metrics: dict[str, float]
    loaded_at: datetime | None
    runtime: Runtime
    last_reload_failure: ReloadFailure | None
    base_value: float | None = None
    """What explanations add up from: the expected churn probability; None when the model cannot be
    explained."""


_E = TypeVar("_E", ChurnLabel, FeatureType, Runtime)


def _mirror(enum: type[_E], wrapper: EnumTypeWrapper, number: int, prefix: str) -> _E:
    """The Python member of a proto enum value; values newer than this client read as UNSPECIFIED."""
    try:
        return enum[wrapper.Name(number).removeprefix(prefix)]
    except (KeyError, ValueError):
        return enum.UNSPECIFIED


def _time(message: Message, field: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime, `None` when unset."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def _model_ref(message: pb.ModelRef) -> ModelRef:
    return ModelRef(name=message.name, version=message.version)


def _feature_value(message: pb.FeatureValue) -> FeatureValue:
    kind = message.WhichOneof("value")
    return FeatureValue(
        name=message.name,
        value=getattr(message, kind) if kind else None,
        event_time=_time(message, "event_time"),
    )


def prediction_from_proto(message: pb.Prediction) -> Prediction:
    """The dataclass of a `Prediction` message."""
    return Prediction(
        user_id=message.user_id,
        label=_mirror(ChurnLabel, pb.ChurnLabel, message.label, "CHURN_LABEL_"),
        churn_probability=message.churn_probability,
        model=_model_ref(message.model),
        features=tuple(_feature_value(f) for f in message.features),
        contributions=tuple(FeatureContribution(c.name, c.contribution) for c in message.contributions),
    )


def batch_result_from_proto(message: pb.BatchPredictResult) -> BatchResult:
    """The dataclass of one `BatchPredictResult`: a prediction or the decoded error status."""
    kind = message.WhichOneof("outcome")
    if kind == "prediction":
        return BatchResult(message.user_id, prediction_from_proto(message.prediction))
    if kind == "error":
        return BatchResult(message.user_id, error_from_status(message.error))
    # A contract violation by the server; reported in place so the rest of the batch stays usable.
    return BatchResult(
        message.user_id,
        ChurnServiceError(grpc.StatusCode.UNKNOWN, "the server sent neither a prediction nor an error"),
    )


def model_info_from_proto(message: pb.ModelInfoResponse) -> ModelInfo:
    """The dataclass of a `ModelInfoResponse`."""
    failure = message.last_reload_failure
    return ModelInfo(
        model=_model_ref(message.model),
        stage=message.stage,
        aliases=tuple(message.aliases),
        run_id=message.run_id,
        model_uri=message.model_uri,
        training_as_of=message.training_as_of,
        feature_service=message.feature_service,
        features=tuple(
            FeatureSchema(
                name=f.name,
                type=_mirror(FeatureType, pb.FeatureType, f.type, "FEATURE_TYPE_"),
                feature_view=f.feature_view,
            )
            for f in message.features
        ),
        metrics=dict(message.metrics),
        loaded_at=_time(message, "loaded_at"),
        runtime=_mirror(Runtime, pb.Runtime, message.runtime, "RUNTIME_"),
        last_reload_failure=ReloadFailure(
            model_version=failure.model_version,
            reason=failure.reason,
            failed_at=_time(failure, "failed_at"),
        )
        if message.HasField("last_reload_failure")
        else None,
        base_value=message.base_value if message.HasField("base_value") else None,
    )
