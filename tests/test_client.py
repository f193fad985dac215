"""ChurnClient and `streamflow-client` against a real server on the session's bootstrapped embedded home.

Results arrive as dataclasses with Python types; every failure a caller can meet arrives as its typed error
with the server's details decoded (the raw wire format of each row is pinned by test_server_errors.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from feast.types import Bool, FeastType, Float64, Int64, String

from streamflow.client import (
    ChurnClient,
    ChurnLabel,
    EntityNotFoundError,
    FeaturesUnavailableError,
    FeatureType,
    FieldViolation,
    InvalidArgumentError,
    ModelRef,
    Prediction,
    Runtime,
    ServiceUnavailableError,
)
from streamflow.feature_repo.definitions import FEATURE_NAMES, VIEW_SPECS
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.proxy import counting_proxy
from tests.fixtures.serving import departed_users, prediction_stub, start_server

UNKNOWN_USER = "9999-99999"
CLIENT_CLI = Path(sys.executable).parent / "streamflow-client"
LAST_SNAPSHOT = datetime(2024, 2, 29, tzinfo=UTC)
# Feast type of each feature -> the client's FeatureType and the Python type of its value.
TYPES: dict[FeastType, tuple[FeatureType, type]] = {
    Int64: (FeatureType.INT64, int),
    Float64: (FeatureType.DOUBLE, float),
    Bool: (FeatureType.BOOL, bool),
    String: (FeatureType.STRING, str),
}
FEATURE_TYPES = {name: TYPES[kind] for spec in VIEW_SPECS for name, kind in spec.features}


@pytest.fixture(scope="module")
def client(served_embedded: str) -> Any:
    with ChurnClient(served_embedded, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def leaver(embedded_settings: Settings) -> str:
    """A user of the first snapshot only: the online store serves their January rows, past the TTL."""
    return departed_users(embedded_settings)[0]


def test_predict_returns_a_typed_prediction(client: ChurnClient) -> None:
    prediction = client.predict(FIRST_USER_ID)

    assert prediction.user_id == FIRST_USER_ID
    assert prediction.model == ModelRef("streamflow_churn", "1")
    assert 0.0 <= prediction.churn_probability <= 1.0
    expected_label = ChurnLabel.CHURN if prediction.churn_probability > 0.5 else ChurnLabel.STAY
    assert prediction.label is expected_label
    assert [f.name for f in prediction.features] == list(FEATURE_NAMES)
    for feature in prediction.features:
        assert type(feature.value) is FEATURE_TYPES[feature.name][1], feature
        assert feature.event_time == LAST_SNAPSHOT


def test_client_reports_what_the_raw_stub_receives(client: ChurnClient, served_embedded: str) -> None:
    with prediction_stub(served_embedded) as stub:
        raw = stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID)).prediction

    prediction = client.predict(FIRST_USER_ID)

    assert prediction.churn_probability == raw.churn_probability
    assert prediction.label.name == pb.ChurnLabel.Name(raw.label).removeprefix("CHURN_LABEL_")
    assert [(f.name, f.value) for f in prediction.features] == [
        (f.name, getattr(f, str(f.WhichOneof("value")))) for f in raw.features
    ]


def test_batch_predict_keeps_order_and_types_each_outcome(client: ChurnClient, leaver: str) -> None:
    user_ids = [FIRST_USER_ID, UNKNOWN_USER, leaver, FIRST_USER_ID]

    results = client.batch_predict(user_ids)

    assert [r.user_id for r in results] == user_ids
    first, unknown, stale, again = (r.outcome for r in results)
    assert first == again == client.predict(FIRST_USER_ID)
    assert isinstance(unknown, EntityNotFoundError)
    assert unknown.reason == "ENTITY_NOT_FOUND"
    assert unknown.missing_features == FEATURE_NAMES
    assert isinstance(stale, FeaturesUnavailableError)
    assert stale.reason == "FEATURES_STALE"
    assert stale.metadata["userId"] == leaver


def test_model_info_describes_the_production_model(client: ChurnClient, embedded_settings: Settings) -> None:
    info = client.model_info()

    assert info.model == ModelRef("streamflow_churn", "1")
    assert info.stage == "Production"
    assert "production" in info.aliases
    assert info.run_id
    assert info.model_uri == embedded_settings.model_uri
    assert info.training_as_of == "2024-01-31"
    assert info.feature_service == "churn_model_v1"
    assert [(f.name, f.type) for f in info.features] == [(n, FEATURE_TYPES[n][0]) for n in FEATURE_NAMES]
    assert {f.feature_view for f in info.features} == {spec.name for spec in VIEW_SPECS}
    assert set(info.metrics) >= {"val_auc", "val_f1", "val_accuracy", "val_precision", "val_recall"}
    assert 0.5 < info.metrics["val_auc"] <= 1.0  # better than chance even on the fixture's small forest
    assert info.loaded_at is not None and info.loaded_at.tzinfo is not None
    # The fixture model's run carries the parity sample the forest kernel reproduces, so the kernel serves.
    assert info.runtime is Runtime.FOREST
    assert info.last_reload_failure is None


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [("", "must not be empty"), ("7590 VHVEG", "holds characters outside [A-Za-z0-9_-]")],
)
def test_malformed_user_id_raises_invalid_argument(client: ChurnClient, user_id: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        client.predict(user_id)

    error = exc.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_USER_ID"
    assert error.domain == "streamflow.serving.v1"
    assert error.metadata == {"userId": user_id, "problem": problem}
    assert error.violations == (FieldViolation("user_id", problem),)
    assert problem in error.message
    assert error.precondition_violations == ()


def test_malformed_batch_raises_invalid_argument_naming_each_id(client: ChurnClient) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        client.batch_predict([FIRST_USER_ID, "bad id", UNKNOWN_USER, ""])

    error = exc.value
    assert error.reason == "INVALID_BATCH"
    assert error.metadata["violations"] == "2"
    assert [v.field for v in error.violations] == ["user_ids[1]", "user_ids[3]"]


def test_empty_batch_raises_invalid_argument(client: ChurnClient) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        client.batch_predict([])

    assert exc.value.reason == "INVALID_BATCH"
    assert exc.value.metadata["batchSize"] == "0"
    assert [v.field for v in exc.value.violations] == ["user_ids"]


def test_unknown_user_raises_entity_not_found_with_the_missing_features(client: ChurnClient) -> None:
    with pytest.raises(EntityNotFoundError) as exc:
        client.predict(UNKNOWN_USER)

    error = exc.value
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.reason == "ENTITY_NOT_FOUND"
    assert error.user_id == UNKNOWN_USER
    assert error.missing_features == FEATURE_NAMES
    assert {v.type for v in error.precondition_violations} == {"FEATURE_MISSING"}
    assert UNKNOWN_USER in error.message


def test_stale_features_raise_features_unavailable_naming_each(client: ChurnClient, leaver: str) -> None:
    with pytest.raises(FeaturesUnavailableError) as exc:
        client.predict(leaver)

    error = exc.value
    aggregates = tuple(name for spec in VIEW_SPECS[1:] for name, _ in spec.features)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "FEATURES_STALE"
    assert error.features == aggregates
    assert error.metadata == {"userId": leaver, "features": ",".join(aggregates)}
    assert {v.type for v in error.precondition_violations} == {"FEATURE_STALE"}


@pytest.mark.parametrize("max_attempts", [1, 4])
def test_no_model_loaded_raises_service_unavailable_after_exactly_max_attempts(
    embedded_settings: Settings, max_attempts: int
) -> None:
    uri = "models:/streamflow_churn@never_set"
    calls = {
        "Predict": lambda client: client.predict(FIRST_USER_ID),
        "BatchPredict": lambda client: client.batch_predict([FIRST_USER_ID]),
        "ModelInfo": lambda client: client.model_info(),
    }
    errors, attempts = [], {}
    with (
        start_server(embedded_settings, wait_for_model=False, model_uri=uri) as running,
        counting_proxy(running.local_address) as proxy,
        ChurnClient(proxy.address, timeout=30, max_attempts=max_attempts) as client,
    ):
        for method, call in calls.items():
            with pytest.raises(ServiceUnavailableError) as exc:
                call(client)
            errors.append(exc.value)
            attempts[method] = proxy.calls(method)

    # Each call reached the server max_attempts times: retried, and no more than asked.
    assert attempts == dict.fromkeys(calls, max_attempts)
    for error in errors:
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert error.reason == "MODEL_NOT_LOADED"
        assert error.metadata == {"modelUri": uri}


def test_a_refused_call_is_not_retried(client: ChurnClient, served_embedded: str) -> None:
    with counting_proxy(served_embedded) as proxy, ChurnClient(proxy.address, timeout=30) as counted:
        with pytest.raises(EntityNotFoundError) as exc:
            counted.predict(UNKNOWN_USER)
        attempts = proxy.calls("Predict")

    assert attempts == 1, "only UNAVAILABLE is retried: NOT_FOUND would be the same answer again"
    assert (exc.value.code, exc.value.reason) == (grpc.StatusCode.NOT_FOUND, "ENTITY_NOT_FOUND")


# --- the CLI, as a subprocess -----------------------------------------------------------------------------


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLIENT_CLI), *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_predict_prints_the_prediction_as_json(client: ChurnClient, served_embedded: str) -> None:
    result = run_cli("--target", served_embedded, "predict", FIRST_USER_ID)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected: Prediction = client.predict(FIRST_USER_ID)
    assert printed["user_id"] == FIRST_USER_ID
    assert printed["label"] == expected.label.value
    assert printed["churn_probability"] == expected.churn_probability
    assert printed["model"] == {"name": "streamflow_churn", "version": "1"}
    assert printed["features"][0] == {
        "name": expected.features[0].name,
        "value": expected.features[0].value,
        "event_time": LAST_SNAPSHOT.isoformat(),
    }


@pytest.mark.parametrize("from_stdin", [False, True])
def test_cli_batch_prints_one_result_per_id(served_embedded: str, from_stdin: bool) -> None:
    user_ids = [FIRST_USER_ID, UNKNOWN_USER]
    args = ("--target", served_embedded, "batch")
    result = run_cli(*args, stdin="\n".join(user_ids)) if from_stdin else run_cli(*args, *user_ids)

    assert result.returncode == 0, result.stderr
    first, unknown = json.loads(result.stdout)
    assert first["user_id"] == FIRST_USER_ID
    assert first["prediction"]["user_id"] == FIRST_USER_ID
    assert unknown["user_id"] == UNKNOWN_USER
    assert unknown["error"]["code"] == "NOT_FOUND"
    assert unknown["error"]["reason"] == "ENTITY_NOT_FOUND"


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_info_prints_the_model(served_embedded: str, where: str) -> None:
    options = ("--target", served_embedded, "--timeout", "30")
    result = run_cli(*options, "info") if where == "before" else run_cli("info", *options)

    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model"] == {"name": "streamflow_churn", "version": "1"}
    assert info["stage"] == "Production"
    assert [f["name"] for f in info["features"]] == list(FEATURE_NAMES)
    assert datetime.fromisoformat(info["loaded_at"]).tzinfo is not None


def test_cli_error_prints_the_decoded_error_on_stderr_and_exits_1(served_embedded: str) -> None:
    result = run_cli("--target", served_embedded, "predict", UNKNOWN_USER)

    assert result.returncode == 1
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert error["code"] == "NOT_FOUND"
    assert error["reason"] == "ENTITY_NOT_FOUND"
    assert error["domain"] == "streamflow.serving.v1"
    assert error["metadata"]["userId"] == UNKNOWN_USER
    assert [v["subject"] for v in error["precondition_violations"]] == list(FEATURE_NAMES)


def test_cli_refuses_a_non_positive_timeout() -> None:
    for args in (("--timeout", "0", "info"), ("info", "--timeout", "0")):
        result = run_cli(*args)

        assert result.returncode == 2
        assert "--timeout: must be a positive number of seconds, got 0" in result.stderr


def test_cli_options_after_the_command_do_not_undo_those_before_it(served_embedded: str) -> None:
    """An option given before the command stays in force when others follow the command."""
    result = run_cli("--target", served_embedded, "predict", "--timeout", "30", FIRST_USER_ID)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user_id"] == FIRST_USER_ID
