"""The server's expected failures and the one table that turns each into a gRPC status (AIP-193).

Every domain exception maps, in `ERROR_TABLE`, to a canonical code and an `ErrorInfo` reason. `status_of`
builds the `google.rpc.Status` for it: the exception's message, exactly one `ErrorInfo` (domain
`streamflow.serving.v1`, lowerCamelCase metadata holding every dynamic value of the message) and a
`BadRequest` or `PreconditionFailure` when the exception names fields or features. The servicer sends that
status with grpcio-status; BatchPredict puts the very same message in a result's `error`. Anything else is
INTERNAL with a request id (`internal_status`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from streamflow.errors import StreamflowError

DOMAIN = "streamflow.serving.v1"
"""The `ErrorInfo.domain` of every error this server sends."""

INTERNAL_REASON = "INTERNAL_ERROR"

MAX_STATUS_BYTES = 7 * 1024
"""Most bytes a failed call's status may put in its trailers (`grpc-message` percent-encoded plus
`grpc-status-details-bin` in base64): under the 8 KiB that gRPC clients accept without complaint (Java's
default limit; grpc core rejects over 16 KiB), whatever the input."""
MAX_ECHOED_CHARS = 80
"""Most characters of a caller's input an error message or metadata value repeats back."""
MAX_FIELD_VIOLATIONS = 20
"""Most `BadRequest` violations one status lists; `violations` in its metadata counts them all."""


def echo(text: str, quoted: bool = False) -> str:
    """`text` as an error repeats it (`quoted`: as a Python literal, so control characters show): at most
    `MAX_ECHOED_CHARS` of it, and the length of a longer one."""
    shown = text[:MAX_ECHOED_CHARS]
    if quoted:
        shown = repr(shown)
    if len(text) > MAX_ECHOED_CHARS:
        shown += f"... ({len(text)} characters)"
    return shown


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

    retry_after_s: float | None = None
    """Set on a failure worth retrying after a known delay: its status then carries `RetryInfo`."""


class InvalidUserId(ServingError):
    """A `user_id` that is empty, too long or outside `[A-Za-z0-9_-]`."""

    def __init__(self, user_id: str, problem: str) -> None:
        super().__init__(
            f"user_id {echo(user_id, quoted=True)} is invalid: {problem}; send 1 to 64 characters of "
            "[A-Za-z0-9_-], e.g. 7590-VHVEG",
            {"userId": echo(user_id), "problem": problem},
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
            violations[:MAX_FIELD_VIOLATIONS],
        )


class MalformedRequest(ServingError):
    """Request bytes that do not decode as the method's request message (e.g. invalid UTF-8 in a string)."""

    def __init__(self, method: str, size: int) -> None:
        super().__init__(
            f"the request to {method} is not a valid {method.rsplit('/', 1)[-1]} request message "
            f"({size} bytes that do not decode); send a message encoded from the service's .proto",
            {"method": method, "requestBytes": str(size)},
        )


class Overloaded(ServingError):
    """The process already runs its maximum number of concurrent calls; the caller should retry later."""

    retry_after_s = 0.1

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the server is running its maximum of {limit} concurrent calls; retry after "
            f"{self.retry_after_s:g} s with backoff",
            {"maxConcurrentRpcs": str(limit)},
        )


class Unauthenticated(ServingError):
    """A call without a recognised token, where the server asks for one. The message never repeats what
    the caller sent: a mistyped token is still close to a secret."""

    HOW: ClassVar[str] = "send the metadata `authorization: Bearer <token>` with a token the operator issued"
    PROBLEMS: ClassVar[dict[str, str]] = {
        "missing": "this server needs a token and the call carries none",
        "malformed": "the call's `authorization` metadata is not `Bearer <token>`",
        "unrecognized": "the call's token is not one this server accepts (unknown or revoked)",
    }

    def __init__(self, problem: str) -> None:
        super().__init__(f"{self.PROBLEMS[problem]}; {self.HOW}", {"credential": problem})


class RateLimited(ServingError):
    """A caller over its quota of users scored per second; the status says when the call would pass."""

    def __init__(self, caller: str, rate: float, cost: int, retry_after_s: float) -> None:
        super().__init__(
            f"caller {echo(caller, quoted=True)} is over its quota of {rate:g} users scored per second "
            f"(this call scores {cost}); retry after {retry_after_s:.3g} s",
            {
                "caller": echo(caller),
                "usersPerSecond": f"{rate:g}",
                "cost": str(cost),
                "retryAfterSeconds": f"{retry_after_s:.3g}",
            },
        )
        self.caller = caller
        self.retry_after_s = retry_after_s


class UnknownService(ServingError):
    """A health check for a service name this server does not report."""

    def __init__(self, service: str) -> None:
        super().__init__(
            f"this server reports no health for service {echo(service, quoted=True)}; ask for '' (the "
            "whole server) or streamflow.serving.v1.PredictionService",
            {"service": echo(service)},
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
    """Some of the user's stored feature values cannot be used: out of their valid range, not finite, or not
    of the feature's registered type."""

    violation_type = "FEATURE_INVALID"

    def __init__(self, user_id: str, problems: Sequence[FeatureProblem]) -> None:
        names = ", ".join(p.feature for p in problems)
        super().__init__(
            user_id,
            problems,
            f"user {user_id} has {len(problems)} invalid feature value(s): {names}; "
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


class ExplanationsUnavailable(ServingError):
    """A call asked to `explain` and the model answering cannot be explained: its structure is not a forest
    the explainer takes, or this install lacks the compiled TreeSHAP kernel."""

    CAUSES: ClassVar[dict[str, str]] = {
        "model": "is not a forest over one-hot and numeric columns",
        "kernel": "is served by an install without the compiled TreeSHAP kernel (reinstall with gcc)",
    }

    def __init__(self, version: str, cause: str) -> None:
        super().__init__(
            f"model version {version} cannot be explained: it {self.CAUSES[cause]}; "
            "send the call without `explain`",
            {"modelVersion": version, "cause": cause},
        )


ERROR_TABLE: dict[type[ServingError], tuple[grpc.StatusCode, str]] = {
    InvalidUserId: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_USER_ID"),
    InvalidBatch: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH"),
    MalformedRequest: (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
    Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    RateLimited: (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    UnknownService: (grpc.StatusCode.NOT_FOUND, "SERVICE_UNKNOWN"),
    EntityNotFound: (grpc.StatusCode.NOT_FOUND, "ENTITY_NOT_FOUND"),
    FeaturesMissing: (grpc.StatusCode.FAILED_PRECONDITION, "FEATURES_MISSING"),
    FeaturesStale: (grpc.StatusCode.FAILED_PRECONDITION, "FEATURES_STALE"),
    FeaturesInvalid: (grpc.StatusCode.FAILED_PRECONDITION, "FEATURES_INVALID"),
    ExplanationsUnavailable: (grpc.StatusCode.FAILED_PRECONDITION, "EXPLANATIONS_UNAVAILABLE"),
    ModelNotLoaded: (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_LOADED"),
    FeatureStoreUnavailable: (grpc.StatusCode.UNAVAILABLE, "FEATURE_STORE_UNAVAILABLE"),
}
"""Each expected failure -> (canonical code, `ErrorInfo.reason`); the proto documents the same rows. A
subclass without a row of its own takes its nearest ancestor's (`row_of`); a test walks every subclass so
that none falls through to `ServingError` itself, which has no row."""


def row_of(error_type: type[ServingError]) -> tuple[grpc.StatusCode, str] | None:
    """The table row of an error type: its own, else its nearest ancestor's; None when no class of its line
    has one (the caller then answers INTERNAL with a request id, as for any unexpected failure)."""
    for ancestor in error_type.__mro__:
        row = ERROR_TABLE.get(ancestor)
        if row is not None:
            return row
    return None


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
    row = row_of(type(error))
    if row is None:
        raise LookupError(f"{type(error).__name__} has no row in ERROR_TABLE")
    code, reason = row
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
    if isinstance(error, RateLimited):
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"caller:{echo(error.caller)}", description=error.message
        )
        status.details.append(_packed(error_details_pb2.QuotaFailure(violations=[violation])))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        status.details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status


def trailer_bytes(status: status_pb2.Status) -> int:
    """What a status costs in a failed call's trailers: the percent-encoded `grpc-message` and the base64
    `grpc-status-details-bin`, as grpc sends them."""
    # grpc-message keeps printable ASCII but '%' as is and percent-encodes every other byte (3 bytes each).
    message = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in status.message.encode())
    return message + len(base64.b64encode(status.SerializeToString()))


def bounded(status: status_pb2.Status) -> status_pb2.Status:
    """`status` cut to fit `MAX_STATUS_BYTES`: the message shortened, then the details after the ErrorInfo
    dropped, so a caller with default metadata limits always receives the code, message and ErrorInfo."""
    if trailer_bytes(status) <= MAX_STATUS_BYTES:
        return status
    cut = status_pb2.Status()
    cut.CopyFrom(status)
    if len(cut.message) > 1000:
        cut.message = cut.message[:1000] + "..."
    while len(cut.details) > 1 and trailer_bytes(cut) > MAX_STATUS_BYTES:
        del cut.details[-1]
    return cut


def internal_status(request_id: str) -> status_pb2.Status:
    """The status of an unexpected failure: a generic message and the request id the server log records."""
    return _status(
        grpc.StatusCode.INTERNAL,
        f"internal error while serving the request; quote request id {request_id} when reporting it",
        INTERNAL_REASON,
        {"requestId": request_id},
    )
