"""The server's expected failures and the one table that turns each into a gRPC status (AIP-193).

Every domain exception maps, in `ERROR_TABLE`, to a canonical code and an `ErrorInfo` reason. `status_of`
builds the `google.rpc.Status` for it: the exception's message, exactly one `ErrorInfo` (domain
`streamflow.serving.v1`, lowerCamelCase metadata holding every dynamic value of the message) and a
`BadRequest` or `PreconditionFailure` when the exception names fields or features. The servicer sends that
status with grpcio-status; BatchPredict puts the very same message in a result's `error`. Anything else is
INTERNAL with a request id (`internal_status`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from streamflow.errors import StreamflowError

DOMAIN = "streamflow.serving.v1"
"""The `ErrorInfo.domain` of every error this server sends."""

INTERNAL_REASON = "INTERNAL_ERROR"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, e.g. `user_ids[3]`, and how to fix it."""

    field: str
    description: str


@dataclass(frozen=True)
class FeatureProblem:
    """One feature that keeps a user from being scored: which, from which view, and what is wrong."""

    feature: str
    feature_view: str
    description: str


class ServingError(StreamflowError):
    """An expected failure of a call; `ERROR_TABLE` gives its status code and reason."""

    def __init__(
        self,
        message: str,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)


class InvalidUserId(ServingError):
    """A `user_id` that is empty, too long or outside `[A-Za-z0-9_-]`."""

    def __init__(self, user_id: str, problem: str) -> None:
        super().__init__(
            f"user_id {user_id!r} is invalid: {problem}; send 1 to 64 characters of [A-Za-z0-9_-], "
            "e.g. 7590-VHVEG",
            {"userId": user_id, "problem": problem},
            [FieldViolation("user_id", problem)],
        )


class InvalidBatch(ServingError):
    """A BatchPredict request that is empty, over the size limit, or holds malformed ids."""

    def __init__(self, violations: Sequence[FieldViolation], batch_size: int, max_batch_size: int) -> None:
        shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:3])
        more = f" (and {len(violations) - 3} more)" if len(violations) > 3 else ""
        super().__init__(
            f"the batch of {batch_size} user ids is invalid: {shown}{more}; "
            f"send 1 to {max_batch_size} ids of 1 to 64 characters of [A-Za-z0-9_-]",
            {
                "batchSize": str(batch_size),
                "maxBatchSize": str(max_batch_size),
                "violations": str(len(violations)),
            },
            violations,
        )


class FeatureError(ServingError):
    """A user whose features cannot be used; each subclass words one kind of problem."""

    violation_type = ""
    """`PreconditionFailure.Violation.type` of each listed feature."""

    def __init__(self, user_id: str, problems: Sequence[FeatureProblem], message: str) -> None:
        super().__init__(message, {"userId": user_id, "features": ",".join(p.feature for p in problems)})
        self.user_id = user_id
        self.problems = tuple(problems)


class EntityNotFound(FeatureError):
    """The online store has no value of any of the model's features for the user."""

    violation_type = "FEATURE_MISSING"

    def __init__(self, user_id: str, problems: Sequence[FeatureProblem]) -> None:
        super().__init__(
            user_id,
            problems,
            f"user {user_id} is unknown to the online store: none of its {len(problems)} features has a "
            "value; check the id, or materialize the features if the user is new",
        )


class FeaturesMissing(FeatureError):
    """Some, not all, of the user's features are null in the online store."""

    violation_type = "FEATURE_MISSING"

    def __init__(self, user_id: str, problems: Sequence[FeatureProblem]) -> None:
        names = ", ".join(p.feature for p in problems)
        super().__init__(
            user_id,
            problems,
            f"user {user_id} lacks {len(problems)} feature(s) in the online store: {names}; "
            "materialize the feature views that hold them",
        )


class FeaturesStale(FeatureError):
    """Some of the user's features are older than their feature view's time-to-live."""

    violation_type = "FEATURE_STALE"

    def __init__(self, user_id: str, problems: Sequence[FeatureProblem]) -> None:
        names = ", ".join(p.feature for p in problems)
        super().__init__(
            user_id,
            problems,
            f"user {user_id} has {len(problems)} stale feature(s): {names}; "
            "load a fresh snapshot and materialize it",
        )


class FeaturesInvalid(FeatureError):
    """Some of the user's feature values lie outside their valid range."""

    violation_type = "FEATURE_INVALID"

    def __init__(self, user_id: str, problems: Sequence[FeatureProblem]) -> None:
        names = ", ".join(p.feature for p in problems)
        super().__init__(
            user_id,
            problems,
            f"user {user_id} has {len(problems)} feature value(s) out of range: {names}; "
            "fix the source rows and materialize them again",
        )


class ModelNotLoaded(ServingError):
    """No model has been loaded yet from the registry."""

    def __init__(self, model_uri: str) -> None:
        super().__init__(
            f"no model is loaded yet from {model_uri}; retry once the server's health is SERVING",
            {"modelUri": model_uri},
        )


class FeatureStoreUnavailable(ServingError):
    """The online store could not be reached."""

    def __init__(self, store: str) -> None:
        super().__init__(f"the {store} online store cannot be reached; retry later", {"onlineStore": store})


ERROR_TABLE: dict[type[ServingError], tuple[grpc.StatusCode, str]] = {
    InvalidUserId: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_USER_ID"),
    InvalidBatch: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH"),
    EntityNotFound: (grpc.StatusCode.NOT_FOUND, "ENTITY_NOT_FOUND"),
    FeaturesMissing: (grpc.StatusCode.FAILED_PRECONDITION, "FEATURES_MISSING"),
    FeaturesStale: (grpc.StatusCode.FAILED_PRECONDITION, "FEATURES_STALE"),
    FeaturesInvalid: (grpc.StatusCode.FAILED_PRECONDITION, "FEATURES_INVALID"),
    ModelNotLoaded: (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_LOADED"),
    FeatureStoreUnavailable: (grpc.StatusCode.UNAVAILABLE, "FEATURE_STORE_UNAVAILABLE"),
}
"""Each expected failure -> (canonical code, `ErrorInfo.reason`); the proto documents the same rows."""


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _status(
    code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str]
) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata))
    return status_pb2.Status(code=code.value[0], message=message, details=[_packed(info)])


def status_of(error: ServingError) -> status_pb2.Status:
    """The `google.rpc.Status` of an expected failure: for a failed call and a BatchPredict result alike."""
    code, reason = ERROR_TABLE[type(error)]
    status = _status(code, error.message, reason, error.metadata)
    if error.field_violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.field_violations
            ]
        )
        status.details.append(_packed(bad_request))
    if isinstance(error, FeatureError):
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=error.violation_type, subject=p.feature, description=p.description
                )
                for p in error.problems
            ]
        )
        status.details.append(_packed(failure))
    return status


def internal_status(request_id: str) -> status_pb2.Status:
    """The status of an unexpected failure: a generic message and the request id the server log records."""
    return _status(
        grpc.StatusCode.INTERNAL,
        f"internal error while serving the request; quote request id {request_id} when reporting it",
        INTERNAL_REASON,
        {"requestId": request_id},
    )
