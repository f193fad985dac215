"""Typed errors of the PredictionService, decoded from the `google.rpc.Status` the server sends.

The server follows AIP-193: one `ErrorInfo` (reason, domain, metadata) plus a `BadRequest` or a
`PreconditionFailure` where they help. Each canonical code a caller handles differently gets its own class;
every other code (INTERNAL, PERMISSION_DENIED, ...) is a plain `ChurnServiceError`. RESOURCE_EXHAUSTED is
`RateLimitedError` for a spent quota and `OverloadedError` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, e.g. `user_ids[3]`, and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    """One unusable piece of state, e.g. a feature (`subject`) that is null or stale (`type`)."""

    type: str
    subject: str
    description: str


@dataclass(eq=False)
class ChurnServiceError(Exception):
    """A failed call: the canonical code, the server's message and its decoded details."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: tuple[FieldViolation, ...] = ()
    precondition_violations: tuple[PreconditionViolation, ...] = ()
    retry_delay_s: float | None = None
    """How long the server asks the caller to wait before a retry (`google.rpc.RetryInfo`), if it said."""

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the error, as the CLI prints it."""
        return {
            "code": self.code.name,
            "message": self.message,
            "reason": self.reason,
            "domain": self.domain,
            "metadata": dict(self.metadata),
            "field_violations": [vars(v) for v in self.field_violations],
            "precondition_violations": [vars(v) for v in self.precondition_violations],
            "retry_delay_s": self.retry_delay_s,
        }


class InvalidArgumentError(ChurnServiceError):
    """The request is malformed (INVALID_ARGUMENT); `field_violations` names each bad field."""

    @property
    def violations(self) -> tuple[FieldViolation, ...]:
        """The invalid fields, e.g. `user_id` or `user_ids[3]`."""
        return self.field_violations


class EntityNotFoundError(ChurnServiceError):
    """The online store knows nothing of the user (NOT_FOUND, reason `ENTITY_NOT_FOUND`)."""

    @property
    def user_id(self) -> str:
        """The unknown user."""
        return self.metadata.get("userId", "")

    @property
    def missing_features(self) -> tuple[str, ...]:
        """The features the store had no value for: all of the model's features."""
        return tuple(v.subject for v in self.precondition_violations)


class FeaturesUnavailableError(ChurnServiceError):
    """Some features are missing, stale or out of range (FAILED_PRECONDITION, reason `FEATURES_*`)."""

    @property
    def features(self) -> tuple[str, ...]:
        """The failing features, one per `PreconditionFailure` violation."""
        return tuple(v.subject for v in self.precondition_violations)


class ServiceUnavailableError(ChurnServiceError):
    """No model loaded yet, the feature store down, or the server unreachable (UNAVAILABLE); retryable."""


class DeadlineExceededError(ChurnServiceError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""


class OverloadedError(ChurnServiceError):
    """The server process runs its maximum of concurrent calls (RESOURCE_EXHAUSTED, reason `OVERLOADED`);
    retry after `retry_delay_s`, with backoff."""


class RateLimitedError(ChurnServiceError):
    """The caller is over its quota of users scored per second (RESOURCE_EXHAUSTED, reason `RATE_LIMITED`);
    the call would pass after `retry_delay_s`."""


class UnauthenticatedError(ChurnServiceError):
    """The server needs a token and the call's is missing, malformed or not recognised (UNAUTHENTICATED);
    `metadata["credential"]` says which."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[ChurnServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: EntityNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FeaturesUnavailableError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}
_ERROR_CLASSES_BY_REASON: dict[str, type[ChurnServiceError]] = {"RATE_LIMITED": RateLimitedError}
"""Where one code has several meanings for a caller (RESOURCE_EXHAUSTED: a busy server or a spent quota)."""
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(status: status_pb2.Status) -> ChurnServiceError:
    """The typed error of a `google.rpc.Status`: a failed call's or one BatchPredict result's."""
    code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    precondition = error_details_pb2.PreconditionFailure()
    retry = error_details_pb2.RetryInfo()
    for detail in status.details:
        # Details of other types are skipped: AIP-193 lets servers add more without breaking clients.
        for message in (info, bad_request, precondition, retry):
            if detail.Is(message.DESCRIPTOR):
                detail.Unpack(message)
    error_class = _ERROR_CLASSES_BY_REASON.get(info.reason) or _ERROR_CLASSES.get(code, ChurnServiceError)
    return error_class(
        code=code,
        message=status.message,
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        field_violations=tuple(FieldViolation(v.field, v.description) for v in bad_request.field_violations),
        precondition_violations=tuple(
            PreconditionViolation(v.type, v.subject, v.description) for v in precondition.violations
        ),
        retry_delay_s=retry.retry_delay.ToNanoseconds() / 1e9 if retry.HasField("retry_delay") else None,
    )


def error_from_rpc_error(error: grpc.RpcError) -> ChurnServiceError:
    """The typed error of a failed call, with the details the server put in its trailers."""
    call = cast(grpc.Call, error)  # a unary call's RpcError is also its grpc.Call
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # trailers disagree with the call's status: trust the call
        status = None
    if status is None:
        # Failures without rich details: raised by the channel itself (deadline, connection refused) or
        # by a server or proxy that does not send them.
        status = status_pb2.Status(code=call.code().value[0], message=call.details() or "")
    return error_from_status(status)
