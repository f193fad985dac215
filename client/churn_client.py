"""`ChurnClient`: the typed Python client of `streamflow.serving.v1.PredictionService`.

Every call has a deadline (the client's default unless given per call). UNAVAILABLE, and a CANCELLED the
server sends, are retried by gRPC itself through the channel's service config, with exponential backoff
inside that same deadline: every RPC of the service is a read, so a repeat is harmless. A worker that stops
cancels the calls it received in the very instant its gRPC server shuts down (grpc core cancels calls it
has not yet handed to the application), so on a long-lived connection to a draining worker about one call
in a few thousand met CANCELLED; the retry takes it to a live worker. A caller's own cancellation is never
retried, and any other code means a retry would get the same answer. Failures raise the typed errors of
`client.errors`.

The channel speaks TLS when a CA or a client certificate is given (mTLS with the certificate and its key),
plaintext otherwise. A token goes with every call as `authorization: Bearer <token>` metadata; the client
never logs it or shows it in its repr.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from streamflow.client.errors import error_from_rpc_error
from streamflow.client.results import (
    BatchResult,
    ModelInfo,
    Prediction,
    batch_result_from_proto,
    model_info_from_proto,
    prediction_from_proto,
)
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_ATTEMPTS = 4
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
# gRPC caps maxAttempts at 5, whatever the service config asks for.
_GRPC_MAX_ATTEMPTS = 5

_Response = TypeVar("_Response", bound=Message)

Pem = bytes | str | os.PathLike[str]
"""PEM data as bytes, or the path of a PEM file."""


def _pem(value: Pem, what: str) -> bytes:
    """The PEM bytes of `value`; OSError when its file cannot be read, ValueError when it holds no PEM."""
    data = value if isinstance(value, bytes) else Path(value).read_bytes()
    if b"-----BEGIN " not in data:
        where = "" if isinstance(value, bytes) else f" {os.fspath(value)}"
        raise ValueError(f"{what}{where} holds no PEM data")
    return data


def _channel_credentials(
    ca: Pem | None, certificate: Pem | None, key: Pem | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when a CA or a client certificate is given (None: plaintext)."""
    if (certificate is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    if ca is None and certificate is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else _pem(ca, "CA certificate"),  # None: the system's roots
        private_key=None if key is None else _pem(key, "client key"),
        certificate_chain=None if certificate is None else _pem(certificate, "client certificate"),
    )


def service_config(max_attempts: int) -> str:
    """The channel's service config: retry UNAVAILABLE up to `max_attempts` calls in all (1 = no retry)."""
    if not 1 <= max_attempts <= _GRPC_MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be between 1 and {_GRPC_MAX_ATTEMPTS}, got {max_attempts}")
    method_config: dict[str, Any] = {"name": [{"service": SERVICE_NAME}]}
    if max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        }
    return json.dumps({"methodConfig": [method_config]})


class ChurnClient:
    """A channel to one PredictionService; use it as a context manager, or call `close()`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        options: Sequence[tuple[str, Any]] = (),
        ca: Pem | None = None,
        certificate: Pem | None = None,
        key: Pem | None = None,
        server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        """Open a channel to `target` (`host:port`).

        `timeout` is the default deadline of a call in seconds, retries included; `max_attempts` bounds the
        calls made for one request when the server answers UNAVAILABLE; `options` are extra gRPC channel
        arguments, e.g. `("grpc.max_receive_message_length", ...)`.

        TLS: `ca` is the CA bundle the server's certificate must chain to; `certificate` and `key` are the
        client's for mTLS (TLS with the system's CAs when only they are given); each is PEM bytes or a file
        path. `server_name` is the name the server's certificate must carry when it differs from the
        target's host. `token` is sent with every call as `authorization: Bearer <token>`.
        Raises OSError when a file cannot be read, ValueError when an argument is unusable.
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        # Metadata values must be printable ASCII; the message does not echo the token.
        if token is not None and not (token and token.isascii() and token.isprintable() and " " not in token):
            raise ValueError("token must be non-empty printable ASCII without spaces")
        credentials = _channel_credentials(ca, certificate, key)
        if server_name is not None and credentials is None:
            raise ValueError("server_name needs TLS (a CA or a client certificate)")
        self._timeout = timeout
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        channel_options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(max_attempts)),
            *([] if server_name is None else [("grpc.ssl_target_name_override", server_name)]),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb_grpc.PredictionServiceStub(self._channel)

    def predict(self, user_id: str, *, explain: bool = False, timeout: float | None = None) -> Prediction:
        """Score one user; raises a `ChurnServiceError` subclass when the user cannot be scored. With
        `explain`, the prediction carries its features' contributions (milliseconds more per user)."""
        request = pb.PredictRequest(user_id=user_id, explain=explain)
        response = self._call(self._stub.Predict, request, timeout)
        return prediction_from_proto(response.prediction)

    def batch_predict(
        self, user_ids: Iterable[str], *, explain: bool = False, timeout: float | None = None
    ) -> list[BatchResult]:
        """Score many users: one result per id, in order, each a `Prediction` (with its contributions when
        `explain`) or a typed error.

        A malformed batch as a whole (empty, over the server's limit, a malformed id) raises
        `InvalidArgumentError`.
        """
        request = pb.BatchPredictRequest(user_ids=list(user_ids), explain=explain)
        response = self._call(self._stub.BatchPredict, request, timeout)
        return [batch_result_from_proto(result) for result in response.results]

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describe the model now answering."""
        response = self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout)
        return model_info_from_proto(response)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> ChurnClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., _Response], request: Message, timeout: float | None) -> _Response:
        try:
            return method(
                request, timeout=self._timeout if timeout is None else timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc_error(error) from error
