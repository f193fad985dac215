"""`streamflow serve` as a real process, configured only through the environment the README documents.

Each setting is set to a value whose effect the test can see over the wire (or in the log), so a variable the
process ignored would fail the test: an IPv6 host, a pinned `models:/name/N` URI while Production is another
version, a staleness clock, the batch limit, reflection, the log level; and a hung (not refused) MLflow
tracking server, which must not keep the server from starting, answering and logging the outage once.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from streamflow.feature_repo.definitions import SNAPSHOT_DATES
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from streamflow.training.registry import promote
from streamflow.training.train import train
from tests.fixtures.processes import START_TIMEOUT_S, serve_env, serving_process
from tests.fixtures.serving import departed_users, prediction_stub, wire_error


def health_status(address: str, timeout_s: float = 10.0) -> int:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout_s
        )
    return int(response.status)


def wait_serving(address: str) -> None:
    """Block until health says SERVING (Watch, bounded by START_TIMEOUT_S)."""
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=START_TIMEOUT_S
        )
        for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise AssertionError("health never said SERVING")


def test_serve_reads_every_setting_it_is_given_from_the_environment(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = fresh_embedded_settings
    # Production moves to version 2; the server is pinned to version 1 and must stay on it.
    promote(settings, train(settings, SNAPSHOT_DATES[-1]).version, "Production", force=True)
    leaver = departed_users(settings)[0]
    env = serve_env(
        STREAMFLOW_HOME=str(settings.home),
        STREAMFLOW_HOST="::1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_MODEL_URI="models:/streamflow_churn/1",
        # A day after the leaver's January rows: fresh. Under the default clock (2024-03-07) they are stale.
        STREAMFLOW_STALENESS_REFERENCE="2024-02-01T00:00:00+00:00",
        STREAMFLOW_MAX_BATCH_SIZE="2",
        STREAMFLOW_REFLECTION="false",
        STREAMFLOW_LOG_LEVEL="WARNING",
    )
    log = tmp_path / "serve.log"
    with serving_process(env, log) as (_, address):
        assert address.startswith("[::1]:")
        wait_serving(address)
        with prediction_stub(address) as stub:
            info = stub.ModelInfo(pb.ModelInfoRequest())
            prediction = stub.Predict(pb.PredictRequest(user_id=leaver)).prediction
            with pytest.raises(grpc.RpcError) as too_big:
                stub.BatchPredict(pb.BatchPredictRequest(user_ids=[FIRST_USER_ID] * 3))
        with grpc.insecure_channel(address) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as no_reflection:
                next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))

    assert (info.model.version, info.model_uri) == ("1", "models:/streamflow_churn/1")
    assert (prediction.user_id, prediction.model.version) == (leaver, "1")
    error = wire_error(too_big.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH")
    assert (error.info.metadata["batchSize"], error.info.metadata["maxBatchSize"]) == ("3", "2")
    assert no_reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # At WARNING, the INFO lines the server logs at start (e.g. "listening on ...") are not written.
    assert not re.search(r" INFO (server|streamflow)\.", log.read_text()), log.read_text()[-2000:]


@pytest.fixture
def hung_tracking_server() -> Iterator[str]:
    """An HTTP address that accepts TCP connections and never answers: a hung MLflow server, not a stopped one
    (a stopped one refuses at once). A bare listening socket stands in for MLflow here because no setting of
    the real server makes it hang; the kernel completes every handshake from the listen backlog."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_hung_registry_is_bounded_by_the_registry_timeout(
    embedded_settings: Settings, hung_tracking_server: str, tmp_path: Path
) -> None:
    uri = "models:/streamflow_churn/Production"
    env = serve_env(
        STREAMFLOW_HOME=str(embedded_settings.home),
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_POLL_INTERVAL_S="0.5",
        STREAMFLOW_REGISTRY_TIMEOUT_S="1",
        MLFLOW_TRACKING_URI=hung_tracking_server,
    )
    log = tmp_path / "serve.log"
    with serving_process(env, log) as (process, address):
        # MLflow's own default waits 120 s per request, 7 times over; bounded, the outage shows well within a
        # minute (a liveness bound, not a measured budget).
        deadline = time.monotonic() + 60
        while "registry unreachable" not in log.read_text():
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, (
                "the outage was never logged: the registry call is not bounded"
            )
            time.sleep(0.1)
        status = health_status(address)
        with prediction_stub(address) as stub, pytest.raises(grpc.RpcError) as not_loaded:
            stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=30)

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    error = wire_error(not_loaded.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_LOADED")
    assert dict(error.info.metadata) == {"modelUri": uri}
    text = log.read_text()
    assert text.count("registry unreachable") == 1, "an outage is logged once, not once per poll"
    assert "Retrying" not in text, "urllib3 logged a line per retry of a failed poll"
    assert hung_tracking_server in text
