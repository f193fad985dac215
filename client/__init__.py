"""Typed Python client of the StreamFlow PredictionService and its CLI (`streamflow-client`).

from streamflow.client import ChurnClient, EntityNotFoundError

with ChurnClient("localhost:50051") as churn:
    print(churn.predict("7590-VHVEG").churn_probability)
"""

from streamflow.client.churn_client import ChurnClient
from streamflow.client.errors import (
    ChurnServiceError,
    DeadlineExceededError,
    EntityNotFoundError,
    FeaturesUnavailableError,
    FieldViolation,
    InvalidArgumentError,
    OverloadedError,
    PreconditionViolation,
    RateLimitedError,
    ServiceUnavailableError,
    UnauthenticatedError,
)
from streamflow.client.results import (
    BatchResult,
    ChurnLabel,
    FeatureContribution,
    FeatureSchema,
    FeatureType,
    FeatureValue,
    ModelInfo,
    ModelRef,
    Prediction,
    ReloadFailure,
    Runtime,
)

__all__ = [
    "BatchResult",
    "ChurnClient",
    "ChurnLabel",
    "ChurnServiceError",
    "DeadlineExceededError",
    "EntityNotFoundError",
    "FeatureContribution",
    "FeatureSchema",
    "FeatureType",
    "FeatureValue",
    "FeaturesUnavailableError",
    "FieldViolation",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelRef",
    "OverloadedError",
    "PreconditionViolation",
    "Prediction",
    "RateLimitedError",
    "ReloadFailure",
    "Runtime",
    "ServiceUnavailableError",
    "UnauthenticatedError",
]
