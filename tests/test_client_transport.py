"""ChurnClient's transport behaviour: which codes gRPC retries, deadlines, and malformed batch results.

The real server cannot be made to answer UNAVAILABLE on the second call and OK on the third, so these tests
start a real gRPC server of the same service whose answers each test scripts, and count the calls that
reach it. Everything crosses a real channel; only the servicer behind it is the test's.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from streamflow.client import (
    ChurnClient,
    ChurnLabel,
    ChurnServiceError,
    DeadlineExceededError,
    EntityNotFoundError,
    FeaturesUnavailableError,
    InvalidArgumentError,
    ModelRef,
    OverloadedError,
    Prediction,
    ServiceUnavailableError,
    cli,
)
from streamflow.client.churn_client import service_config
from streamflow.client.cli import TOKEN_VARIABLE
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc


def scripted_failure(code: grpc.StatusCode) -> grpc.Status:
    """A failure as the server sends it: the code, a message, and an ErrorInfo in the trailers."""
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason=f"SCRIPTED_{code.name}", domain="test", metadata={"attempt": "n"})
    )
    status = status_pb2.Status(code=code.value[0], message=f"scripted {code.name}", details=[info])
    return rpc_status.to_status(status)


@dataclass(frozen=True)
class Rewritten(grpc.Status):
    """A status whose message no longer matches the google.rpc.Status in its trailers."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class ScriptedService(pb_grpc.PredictionServiceServicer):
    """Fails the first calls with the scripted codes, then answers; counts every call it receives."""

    def __init__(self) -> None:
        self.failures: list[grpc.Status] = []
        self.attempts = 0
        self.authorizations: list[str | bytes | None] = []  # each call's `authorization` metadata
        self.hang = threading.Event()  # set: Predict waits until `release` instead of answering
        self.release = threading.Event()
        self._lock = threading.Lock()

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        with self._lock:
            self.attempts += 1
            attempt = self.attempts
            self.authorizations.append(dict(context.invocation_metadata()).get("authorization"))
        if self.hang.is_set():
            self.release.wait(timeout=60)
        if attempt <= len(self.failures):
            context.abort_with_status(self.failures[attempt - 1])
        return pb.PredictResponse(
            prediction=pb.Prediction(
                user_id=request.user_id,
                label=pb.CHURN_LABEL_CHURN,
                churn_probability=0.75,
                model=pb.ModelRef(name="scripted", version="1"),
            )
        )

    def BatchPredict(
        self, request: pb.BatchPredictRequest, context: grpc.ServicerContext
    ) -> pb.BatchPredictResponse:
        # A result with neither outcome: the contract forbids it, the client must still report it in place.
        return pb.BatchPredictResponse(results=[pb.BatchPredictResult(user_id=u) for u in request.user_ids])


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedService, str]]:
    service = ScriptedService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port != 0, "could not bind a free port"
    server.start()
    yield service, f"127.0.0.1:{port}"
    service.release.set()
    server.stop(grace=None)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_unavailable_and_server_cancelled_are_retried_until_the_call_succeeds(
    scripted: tuple[ScriptedService, str], code: grpc.StatusCode
) -> None:
    service, target = scripted
    service.failures = [scripted_failure(code)] * 2
    with ChurnClient(target, timeout=30) as client:
        prediction = client.predict("7590-VHVEG")
    assert prediction == Prediction(
        user_id="7590-VHVEG",
        label=ChurnLabel.CHURN,
        churn_probability=0.75,
        model=ModelRef("scripted", "1"),
        features=(),
    )
    assert service.attempts == 3


def test_unavailable_gives_up_after_max_attempts(scripted: tuple[ScriptedService, str]) -> None:
    service, target = scripted
    service.failures = [scripted_failure(grpc.StatusCode.UNAVAILABLE)] * 10
    with (
        ChurnClient(target, timeout=30, max_attempts=4) as client,
        pytest.raises(ServiceUnavailableError) as exc,
    ):
        client.predict("7590-VHVEG")
    assert service.attempts == 4
    assert exc.value.code is grpc.StatusCode.UNAVAILABLE
    assert exc.value.reason == "SCRIPTED_UNAVAILABLE"
    assert exc.value.message == "scripted UNAVAILABLE"


def test_max_attempts_of_one_disables_retry(scripted: tuple[ScriptedService, str]) -> None:
    service, target = scripted
    service.failures = [scripted_failure(grpc.StatusCode.UNAVAILABLE)]
    with ChurnClient(target, timeout=30, max_attempts=1) as client, pytest.raises(ServiceUnavailableError):
        client.predict("7590-VHVEG")
    assert service.attempts == 1


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, EntityNotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, FeaturesUnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
        (grpc.StatusCode.INTERNAL, ChurnServiceError),
    ],
)
def test_other_codes_are_not_retried(
    scripted: tuple[ScriptedService, str], code: grpc.StatusCode, error_class: type[ChurnServiceError]
) -> None:
    service, target = scripted
    service.failures = [scripted_failure(code)]
    with ChurnClient(target, timeout=30) as client, pytest.raises(ChurnServiceError) as exc:
        client.predict("7590-VHVEG")
    assert service.attempts == 1
    assert type(exc.value) is error_class
    assert exc.value.code is code
    assert exc.value.reason == f"SCRIPTED_{code.name}"
    assert exc.value.metadata == {"attempt": "n"}


def test_details_that_disagree_with_the_call_are_ignored(scripted: tuple[ScriptedService, str]) -> None:
    service, target = scripted
    # What a proxy that rewrites the message but passes the trailers on would deliver.
    original = scripted_failure(grpc.StatusCode.INVALID_ARGUMENT)
    service.failures = [Rewritten(original.code, "rewritten by a proxy", original.trailing_metadata)]
    with ChurnClient(target, timeout=30) as client, pytest.raises(InvalidArgumentError) as exc:
        client.predict("7590-VHVEG")
    assert exc.value.message == "rewritten by a proxy"
    assert exc.value.reason == ""  # the call's own code and message win over details that contradict them


def test_deadline_exceeded_is_a_typed_error(scripted: tuple[ScriptedService, str]) -> None:
    service, target = scripted
    service.hang.set()  # the server never answers before the deadline
    with ChurnClient(target, timeout=30) as client, pytest.raises(DeadlineExceededError) as exc:
        client.predict("7590-VHVEG", timeout=0.2)
    assert exc.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert exc.value.reason == ""  # raised by the channel: no server details
    assert service.attempts == 1


def test_unreachable_server_is_service_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        ChurnClient(f"127.0.0.1:{port}", timeout=30) as client,
        pytest.raises(ServiceUnavailableError) as exc,
    ):
        client.predict("7590-VHVEG")
    assert exc.value.code is grpc.StatusCode.UNAVAILABLE
    assert exc.value.reason == ""  # raised by the channel: no server details
    assert "failed to connect" in exc.value.message


def test_batch_result_without_outcome_is_reported_in_place(scripted: tuple[ScriptedService, str]) -> None:
    _, target = scripted
    with ChurnClient(target, timeout=30) as client:
        results = client.batch_predict(["7590-VHVEG", "5575-GNVDE"])
    assert [r.user_id for r in results] == ["7590-VHVEG", "5575-GNVDE"]
    for result in results:
        assert isinstance(result.outcome, ChurnServiceError)
        assert result.outcome.code is grpc.StatusCode.UNKNOWN
        assert "neither a prediction nor an error" in result.outcome.message


@pytest.mark.parametrize("max_attempts", [0, 6])
def test_max_attempts_outside_grpc_bounds_is_refused(max_attempts: int) -> None:
    with pytest.raises(ValueError, match="max_attempts must be between 1 and 5"):
        service_config(max_attempts)


def test_non_positive_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        ChurnClient("localhost:50051", timeout=0)


def test_a_token_goes_with_every_attempt_and_stays_out_of_sight(
    scripted: tuple[ScriptedService, str],
) -> None:
    service, target = scripted
    service.failures = [scripted_failure(grpc.StatusCode.UNAVAILABLE)]
    with ChurnClient(target, timeout=30, token="tok-3f9a.secret") as client:
        client.predict("7590-VHVEG")
        shown = repr(client)
    with ChurnClient(target, timeout=30) as anonymous:
        anonymous.predict("7590-VHVEG")

    assert service.authorizations == ["Bearer tok-3f9a.secret"] * 2 + [None]  # the retry carried it too
    assert "tok-3f9a" not in shown


def test_the_cli_reads_the_token_from_the_environment(
    scripted: tuple[ScriptedService, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    service, target = scripted
    monkeypatch.setenv(TOKEN_VARIABLE, "tok-from-env")

    code = cli.main(["--target", target, "predict", "7590-VHVEG"])

    assert code == 0
    assert service.authorizations == ["Bearer tok-from-env"]
    assert "tok-from-env" not in "".join(capsys.readouterr())


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"token": "two words"}, "token must be non-empty printable ASCII without spaces"),
        ({"token": ""}, "token must be non-empty printable ASCII without spaces"),
        ({"certificate": b"-----BEGIN CERTIFICATE-----"}, "a client certificate needs its key"),
        ({"server_name": "serving.internal"}, "server_name needs TLS"),
        ({"ca": b"not pem"}, "CA certificate holds no PEM data"),
    ],
)
def test_unusable_security_arguments_are_value_errors(arguments: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError) as exc:
        ChurnClient("127.0.0.1:1", **arguments)

    assert str(exc.value).startswith(problem)
    assert "two words" not in str(exc.value)
