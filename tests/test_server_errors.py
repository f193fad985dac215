"""Every row of the server's error table over a real channel: code, ErrorInfo reason and metadata, details.

The feature data behind each row is real: written into the online store of a private copy of the bootstrapped
home through Feast's own write path (or, for stale features, the demo data's own leavers).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.client import ChurnClient, OverloadedError
from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import FEATURE_NAMES, JOIN_KEY, VIEW_SPECS
from streamflow.server.app import PredictionServer
from streamflow.server.batcher import PredictBatcher
from streamflow.server.domain import Prediction
from streamflow.server.errors import ERROR_TABLE, EntityNotFound, FeatureError
from streamflow.server.model_watcher import ModelWatcher
from streamflow.server.predictor import Predictor
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.serving import (
    WireError,
    departed_users,
    prediction_stub,
    server_settings,
    start_server,
    wire_error,
    write_user_features,
)
from tests.fixtures.training import relocate_home

UNKNOWN_USER = "9999-99999"
NEWCOMER = "NEW-0001"  # only a subscription profile so far: its aggregates were never computed
NULL_HOURS = "NULL-0001"  # every view, but watch_hours_30d is null
NEGATIVE = "NEG-0001"  # a negative monthly_fee and months_active
BAD_TYPE = "BADTYPE-0001"  # monthly_fee stored as a string: the store disagrees with the registry
BROKEN = "BROKEN-0001"  # scoring it fails unexpectedly (BrokenPredictor)
MAX_BATCH = 8
PROFILE_FEATURES = [name for name, _ in VIEW_SPECS[0].features]
AGGREGATE_FEATURES = [name for spec in VIEW_SPECS[1:] for name, _ in spec.features]


def private_home(source: Settings, home: Path) -> Settings:
    relocate_home(source.home, home)
    settings = source.model_copy(update={"home": home})
    store.apply(settings)
    return settings


@pytest.fixture(scope="module")
def error_settings(embedded_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A private home whose online store also holds the users each error row needs."""
    settings = private_home(embedded_settings, tmp_path_factory.mktemp("errors") / "home")
    write_user_features(settings, NEWCOMER, views=[VIEW_SPECS[0].name])
    write_user_features(settings, NULL_HOURS, watch_hours_30d=None)
    write_user_features(settings, NEGATIVE, monthly_fee=-5.0, months_active=-1)
    write_user_features(settings, BAD_TYPE)
    feast = store.open_store(settings)
    # Below Feast's typed writer, which would refuse it: what a buggy loader could leave behind.
    feast._get_provider().online_write_batch(
        feast.config,
        feast.get_feature_view(VIEW_SPECS[0].name),
        [
            (
                EntityKey(join_keys=[JOIN_KEY], entity_values=[Value(string_val=BAD_TYPE)]),
                {"monthly_fee": Value(string_val="eighty")},
                datetime(2024, 2, 29, tzinfo=UTC),
                None,
            )
        ],
        None,
    )
    return settings


@pytest.fixture(scope="module")
def error_server(error_settings: Settings) -> Iterator[PredictionServer]:
    with start_server(error_settings, max_batch_size=MAX_BATCH) as running:
        yield running


@pytest.fixture(scope="module")
def stub(error_server: PredictionServer) -> Iterator[pb_grpc.PredictionServiceStub]:
    with prediction_stub(error_server.local_address) as stub:
        yield stub


def predict_error(stub: pb_grpc.PredictionServiceStub, user_id: str) -> WireError:
    with pytest.raises(grpc.RpcError) as failure:
        stub.Predict(pb.PredictRequest(user_id=user_id))
    return wire_error(failure.value)


def batch_error(stub: pb_grpc.PredictionServiceStub, user_ids: list[str]) -> WireError:
    with pytest.raises(grpc.RpcError) as failure:
        stub.BatchPredict(pb.BatchPredictRequest(user_ids=user_ids))
    return wire_error(failure.value)


def test_every_error_reason_is_distinct_and_upper_snake() -> None:
    reasons = [reason for _, reason in ERROR_TABLE.values()]
    assert len(set(reasons)) == len(reasons)
    assert all(reason.isupper() and " " not in reason for reason in reasons)


def test_predict_answers_with_typed_features_and_their_event_times(
    stub: pb_grpc.PredictionServiceStub,
) -> None:
    response = stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID))

    prediction = response.prediction
    assert prediction.user_id == FIRST_USER_ID
    assert prediction.label in (pb.CHURN_LABEL_STAY, pb.CHURN_LABEL_CHURN)
    assert 0.0 <= prediction.churn_probability <= 1.0
    assert (prediction.label == pb.CHURN_LABEL_CHURN) == (prediction.churn_probability > 0.5)
    assert (prediction.model.name, prediction.model.version) == ("streamflow_churn", "1")
    assert [f.name for f in prediction.features] == list(FEATURE_NAMES)
    kinds = {f.name: f.WhichOneof("value") for f in prediction.features}
    assert kinds["months_active"] == "int64_value"
    assert kinds["monthly_fee"] == "double_value"
    assert kinds["paperless_billing"] == "bool_value"
    assert kinds["net_service"] == "string_value"
    last_snapshot = datetime(2024, 2, 29, tzinfo=UTC)
    assert {f.event_time.ToDatetime(tzinfo=UTC) for f in prediction.features} == {last_snapshot}


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("", "must not be empty"),
        ("A" * 65, "has 65 characters, more than 64"),
        ("7590 VHVEG", "holds characters outside [A-Za-z0-9_-]"),
        ("7590/VHVEG", "holds characters outside [A-Za-z0-9_-]"),
    ],
)
def test_malformed_user_id_is_invalid_argument(
    stub: pb_grpc.PredictionServiceStub, user_id: str, problem: str
) -> None:
    error = predict_error(stub, user_id)

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_USER_ID"
    assert dict(error.info.metadata) == {"userId": user_id, "problem": problem}
    assert error.bad_request is not None
    assert [(v.field, v.description) for v in error.bad_request.field_violations] == [("user_id", problem)]
    assert problem in error.status.message
    assert error.precondition is None


def test_a_64_character_id_is_well_formed(stub: pb_grpc.PredictionServiceStub) -> None:
    error = predict_error(stub, "A" * 64)

    assert error.code == grpc.StatusCode.NOT_FOUND


def test_unknown_user_is_not_found_with_every_feature_listed(stub: pb_grpc.PredictionServiceStub) -> None:
    error = predict_error(stub, UNKNOWN_USER)

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info.reason == "ENTITY_NOT_FOUND"
    assert error.info.metadata["userId"] == UNKNOWN_USER
    assert error.info.metadata["features"].split(",") == list(FEATURE_NAMES)
    assert error.failing_features == list(FEATURE_NAMES)
    assert error.precondition is not None
    assert {v.type for v in error.precondition.violations} == {"FEATURE_MISSING"}
    assert UNKNOWN_USER in error.status.message


@pytest.mark.parametrize(
    ("user_id", "missing"),
    [(NEWCOMER, AGGREGATE_FEATURES), (NULL_HOURS, ["watch_hours_30d"])],
)
def test_some_null_features_are_features_missing(
    stub: pb_grpc.PredictionServiceStub, user_id: str, missing: list[str]
) -> None:
    error = predict_error(stub, user_id)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "FEATURES_MISSING"
    assert dict(error.info.metadata) == {"userId": user_id, "features": ",".join(missing)}
    assert error.failing_features == missing
    assert error.precondition is not None
    assert {v.type for v in error.precondition.violations} == {"FEATURE_MISSING"}
    assert all(v.description.startswith("no value in feature view") for v in error.precondition.violations)


def test_features_older_than_their_view_ttl_are_stale(
    stub: pb_grpc.PredictionServiceStub, error_settings: Settings
) -> None:
    leaver = departed_users(error_settings)[0]

    error = predict_error(stub, leaver)

    # The January rows of a leaver are 36 days old on the demo clock (2024-03-07): past the aggregates'
    # 35-day TTL, inside the profile's 90 days.
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "FEATURES_STALE"
    assert dict(error.info.metadata) == {"userId": leaver, "features": ",".join(AGGREGATE_FEATURES)}
    assert error.failing_features == AGGREGATE_FEATURES
    assert error.precondition is not None
    assert {v.type for v in error.precondition.violations} == {"FEATURE_STALE"}
    assert "2024-01-31" in error.precondition.violations[0].description


def test_values_out_of_range_are_features_invalid(stub: pb_grpc.PredictionServiceStub) -> None:
    error = predict_error(stub, NEGATIVE)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "FEATURES_INVALID"
    assert dict(error.info.metadata) == {"userId": NEGATIVE, "features": "months_active,monthly_fee"}
    assert error.failing_features == ["months_active", "monthly_fee"]
    assert error.precondition is not None
    assert [v.description for v in error.precondition.violations] == [
        "-1 is outside the valid range [0, inf]",
        "-5.0 is outside the valid range [0, inf]",
    ]


class BrokenPredictor(Predictor):
    """A stand-in for a bug: since a wrongly typed stored value became FEATURES_INVALID, no real input makes
    scoring fail unexpectedly, so this Predictor fails for `BROKEN` users with internals in the exception."""

    def score(self, user_ids: Sequence[str], explain: bool = False) -> list[Prediction | FeatureError]:
        if BROKEN in user_ids:
            raise RuntimeError("secret internals: /srv/models/v7 string_val")
        return super().score(user_ids, explain)


@pytest.fixture(scope="module")
def broken_server(error_settings: Settings) -> Iterator[PredictionServer]:
    settings = server_settings(error_settings)
    with start_server(error_settings, predictor=BrokenPredictor(settings, ModelWatcher(settings))) as running:
        yield running


@pytest.mark.parametrize("rpc", ["Predict", "BatchPredict"])
def test_unexpected_failure_is_internal_with_a_request_id_and_no_internals(
    broken_server: PredictionServer, caplog: pytest.LogCaptureFixture, rpc: str
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="streamflow.server.rpc"),
        prediction_stub(broken_server.local_address) as stub,
    ):
        with pytest.raises(grpc.RpcError) as failure:
            if rpc == "Predict":
                stub.Predict(pb.PredictRequest(user_id=BROKEN))
            else:
                stub.BatchPredict(pb.BatchPredictRequest(user_ids=[FIRST_USER_ID, BROKEN]))
        error = wire_error(failure.value)

    assert error.code == grpc.StatusCode.INTERNAL
    assert error.info.reason == "INTERNAL_ERROR"
    request_id = error.info.metadata["requestId"]
    assert dict(error.info.metadata) == {"requestId": request_id}
    assert request_id in error.status.message
    assert "secret" not in error.status.message and "string_val" not in error.status.message
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "secret internals" in str(logged[0].exc_info[1])


def test_a_stored_value_of_the_wrong_type_is_features_invalid(stub: pb_grpc.PredictionServiceStub) -> None:
    error = predict_error(stub, BAD_TYPE)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "FEATURES_INVALID"
    assert dict(error.info.metadata) == {"userId": BAD_TYPE, "features": "monthly_fee"}
    assert error.failing_features == ["monthly_fee"]
    assert "eighty" not in error.status.message


def test_batch_results_keep_order_and_carry_the_status_predict_returns(
    stub: pb_grpc.PredictionServiceStub, error_settings: Settings
) -> None:
    leaver = departed_users(error_settings)[0]
    user_ids = [FIRST_USER_ID, UNKNOWN_USER, leaver, NEWCOMER, NEGATIVE, FIRST_USER_ID]

    response = stub.BatchPredict(pb.BatchPredictRequest(user_ids=user_ids))

    assert [r.user_id for r in response.results] == user_ids
    assert [r.WhichOneof("outcome") for r in response.results] == [
        "prediction",
        "error",
        "error",
        "error",
        "error",
        "prediction",
    ]
    single = stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID)).prediction
    assert response.results[0].prediction == single
    assert response.results[5].prediction == single
    for result in response.results[1:5]:
        assert result.error == predict_error(stub, result.user_id).status
    reasons = [WireError.of(r.error).info.reason for r in response.results[1:5]]
    assert reasons == ["ENTITY_NOT_FOUND", "FEATURES_STALE", "FEATURES_MISSING", "FEATURES_INVALID"]


def test_empty_batch_is_invalid(stub: pb_grpc.PredictionServiceStub) -> None:
    error = batch_error(stub, [])

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_BATCH"
    assert dict(error.info.metadata) == {"batchSize": "0", "maxBatchSize": str(MAX_BATCH), "violations": "1"}
    assert error.violated_fields == ["user_ids"]


def test_batch_over_the_limit_is_invalid(stub: pb_grpc.PredictionServiceStub) -> None:
    error = batch_error(stub, [FIRST_USER_ID] * (MAX_BATCH + 1))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_BATCH"
    assert error.info.metadata["batchSize"] == str(MAX_BATCH + 1)
    assert error.info.metadata["maxBatchSize"] == str(MAX_BATCH)
    assert error.bad_request is not None
    assert [(v.field, v.description) for v in error.bad_request.field_violations] == [
        ("user_ids", f"holds {MAX_BATCH + 1} ids, more than {MAX_BATCH}")
    ]


def test_batch_names_each_malformed_id(stub: pb_grpc.PredictionServiceStub) -> None:
    error = batch_error(stub, [FIRST_USER_ID, "bad id", UNKNOWN_USER, ""])

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_BATCH"
    assert error.info.metadata["violations"] == "2"
    assert error.bad_request is not None
    assert [(v.field, v.description) for v in error.bad_request.field_violations] == [
        ("user_ids[1]", "holds characters outside [A-Za-z0-9_-]"),
        ("user_ids[3]", "must not be empty"),
    ]
    assert "user_ids[1]" in error.status.message


def test_no_model_yet_is_unavailable_for_every_rpc(embedded_settings: Settings) -> None:
    uri = "models:/streamflow_churn@never_set"
    errors = []
    with (
        start_server(embedded_settings, wait_for_model=False, model_uri=uri) as running,
        prediction_stub(running.local_address) as stub,
    ):
        for call, request in [
            (stub.Predict, pb.PredictRequest(user_id=FIRST_USER_ID)),
            (stub.BatchPredict, pb.BatchPredictRequest(user_ids=[FIRST_USER_ID])),
            (stub.ModelInfo, pb.ModelInfoRequest()),
        ]:
            with pytest.raises(grpc.RpcError) as failure:
                call(request)
            errors.append(wire_error(failure.value))

    for error in errors:
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.info.reason == "MODEL_NOT_LOADED"
        assert dict(error.info.metadata) == {"modelUri": uri}
        assert uri in error.status.message


def test_unreachable_online_store_is_unavailable_and_ids_are_checked_before_it(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = private_home(embedded_settings, tmp_path / "home")
    online_store = settings.feast_dir / "online_store.db"
    online_store.unlink()
    online_store.mkdir()  # SQLite cannot open a folder: the store is there but unusable

    with start_server(settings) as running, prediction_stub(running.local_address) as stub:
        single = predict_error(stub, FIRST_USER_ID)
        batch = batch_error(stub, [FIRST_USER_ID, UNKNOWN_USER])
        malformed = predict_error(stub, "bad id")
    shutil.rmtree(online_store)

    for error in (single, batch):
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.info.reason == "FEATURE_STORE_UNAVAILABLE"
        assert dict(error.info.metadata) == {"onlineStore": "sqlite"}
    # Validation comes first: a malformed id never reaches the (broken) store.
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert malformed.info.reason == "INVALID_USER_ID"


def test_calls_beyond_the_concurrency_limit_are_resource_exhausted_and_health_still_answers(
    embedded_settings: Settings,
) -> None:
    with (
        start_server(embedded_settings, max_concurrent_rpcs=1, threads=1) as running,
        grpc.insecure_channel(running.local_address) as channel,
    ):
        stub = pb_grpc.PredictionServiceStub(channel)
        # The server's one batch thread is kept busy, so an admitted BatchPredict stays in flight.
        release = threading.Event()
        running.pools[-1].submit(release.wait)
        held = stub.BatchPredict.future(pb.BatchPredictRequest(user_ids=[FIRST_USER_ID]))
        try:
            deadline = time.monotonic() + 30
            while running.guard.in_flight < 1:
                assert time.monotonic() < deadline, "the BatchPredict never reached the server"
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as failure:
                stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID))
            with ChurnClient(running.local_address) as client, pytest.raises(OverloadedError) as typed:
                client.predict(FIRST_USER_ID)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        finally:
            release.set()
        held_result = held.result(timeout=30)

    error = wire_error(failure.value)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.info.reason == "OVERLOADED"
    assert dict(error.info.metadata) == {"maxConcurrentRpcs": "1"}
    assert error.retry is not None and error.retry.retry_delay.ToMilliseconds() == 100
    assert (typed.value.reason, typed.value.retry_delay_s) == ("OVERLOADED", 0.1)
    assert typed.value.metadata == {"maxConcurrentRpcs": "1"}
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert held_result.results[0].HasField("prediction")


def test_when_one_users_scoring_fails_unexpectedly_in_a_coalesced_batch_only_that_call_fails(
    broken_server: PredictionServer,
) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        batcher = PredictBatcher(broken_server.predictor.score, pool, max_batch_size=1000)

        async def together() -> list[Prediction | BaseException]:
            calls = (batcher.predict(user_id) for user_id in (FIRST_USER_ID, BROKEN, UNKNOWN_USER))
            return await asyncio.gather(*calls, return_exceptions=True)

        good, broken, unknown = asyncio.run(together())

    assert isinstance(good, Prediction) and good.user_id == FIRST_USER_ID
    assert isinstance(broken, RuntimeError)  # the guard answers it as INTERNAL (test above)
    assert isinstance(unknown, EntityNotFound) and unknown.user_id == UNKNOWN_USER
