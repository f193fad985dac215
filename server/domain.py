"""Plain types the server works with; protobuf stays in `converters.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from streamflow.server.prediction_log import AwaitingShadow
    from streamflow.server.shadow import ShadowReport

FeatureScalar = int | float | bool | str


class FeatureType(StrEnum):
    """Value type of a served feature (the Feast types the contract can carry)."""

    INT64 = "int64"
    DOUBLE = "double"
    BOOL = "bool"
    STRING = "string"


class Runtime(StrEnum):
    """Inference engine that scores requests."""

    SKLEARN = "sklearn"
    ONNX = "onnx"
    FOREST = "forest"


@dataclass(frozen=True)
class FeatureSchema:
    """One feature of a model: its short name, value type and Feast feature view."""

    name: str
    type: FeatureType
    feature_view: str


class FeatureValue(NamedTuple):
    """One typed feature value read from the online store, with the event time of its row.

    A NamedTuple rather than a frozen dataclass: a 1,000-user batch builds 14,000 of them, and a tuple is
    built in half the time."""

    name: str
    value: FeatureScalar
    event_time: datetime


@dataclass(frozen=True)
class ModelRef:
    """A registered model version."""

    name: str
    version: str


@dataclass(frozen=True)
class Prediction:
    """One user's churn score and what produced it."""

    user_id: str
    churn: bool
    churn_probability: float
    model: ModelRef
    features: tuple[FeatureValue, ...]
    contributions: tuple[tuple[str, float], ...] = ()
    """(feature, TreeSHAP contribution) pairs, largest magnitude first, when the call asked to `explain`."""
    shadow: AwaitingShadow | None = field(default=None, compare=False, repr=False)
    """Where the prediction log's record goes when the shadow also scores this user (None otherwise)."""


@dataclass(frozen=True)
class ReloadFailure:
    """A model version the server refused to serve, and why: `reason` is a short fixed sentence per kind of
    refusal, safe for any caller (never an exception's text or a path); the server log has the detail."""

    model_version: str
    reason: str
    failed_at: datetime


@dataclass(frozen=True)
class ModelInfo:
    """What ModelInfo reports: the model answering now and the last version refused since it was loaded."""

    model: ModelRef
    stage: str
    aliases: tuple[str, ...]
    run_id: str
    model_uri: str
    training_as_of: str
    feature_service: str
    features: tuple[FeatureSchema, ...]
    metrics: dict[str, float]
    loaded_at: datetime
    runtime: Runtime
    last_reload_failure: ReloadFailure | None
    base_value: float | None = None
    """What explanations add up from (TreeSHAP's expected value); None when the model cannot be explained."""
    shadow: ShadowReport | None = None
    """What the shadow model learnt beside this one; None when the server runs no shadow."""
