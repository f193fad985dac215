"""README claims about a running server that no other test pins, each over a real channel to a real server:
the scikit-learn fallback as ModelInfo reports it, client retries that stop at the deadline, a BatchPredict
in flight across a promotion answering from one version, and health answering while batches run."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient

from streamflow.client import ChurnClient, DeadlineExceededError
from streamflow.feature_repo.definitions import JOIN_KEY, SNAPSHOT_DATES, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.model_contract import ARTIFACT_DIR, PROBABILITY_TOLERANCE
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID, snapshot_timestamp, table_path
from streamflow.training.registry import promote
from streamflow.training.train import train
from tests.fixtures.proxy import counting_proxy
from tests.fixtures.serving import prediction_stub, start_server

LIVENESS_TIMEOUT_S = 120.0
"""Upper bound on waiting for something that must happen; liveness only, never a measured budget."""


def current_users(settings: Settings) -> list[str]:
    """Users of the last snapshot (all of their features are fresh under the default clock)."""
    table = pd.read_parquet(table_path(settings, VIEW_SPECS[0].table))
    latest = table[table[TIMESTAMP_FIELD] == snapshot_timestamp(SNAPSHOT_DATES[-1])]
    return sorted(latest[JOIN_KEY])


def test_model_info_reports_sklearn_after_an_onnx_fallback(
    fresh_embedded_settings: Settings, served_embedded: str
) -> None:
    settings = fresh_embedded_settings
    # An explicit client, not training's mlflow_client: nothing process-wide may point MLflow at this home,
    # the server must find the model from its own settings.
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    run_id = str(client.get_model_version(settings.model_name, "1").run_id)
    # Version 1 without its ONNX export: the same model of record, nothing compiled to serve it with.
    (export,) = settings.artifact_root.glob(f"**/{run_id}/artifacts/{ARTIFACT_DIR}")
    shutil.rmtree(export)

    with start_server(settings) as running, prediction_stub(running.local_address) as stub:
        info = stub.ModelInfo(pb.ModelInfoRequest())
        fallback = stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID)).prediction
    with prediction_stub(served_embedded) as stub:
        compiled = stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID)).prediction

    assert info.runtime == pb.RUNTIME_SKLEARN
    assert info.model.version == "1"
    assert fallback.model.version == "1"
    assert fallback.churn_probability == pytest.approx(compiled.churn_probability, abs=PROBABILITY_TOLERANCE)


def test_client_retries_stop_at_the_deadline(embedded_settings: Settings) -> None:
    """Every attempt meets UNAVAILABLE (no model) after a 0.2 s hop, so 5 attempts would need at least 1 s: a
    0.5 s deadline must end the retries first, with DEADLINE_EXCEEDED, and nothing may be sent after it."""
    uri = "models:/streamflow_churn@never_set"
    with (
        start_server(embedded_settings, wait_for_model=False, model_uri=uri) as running,
        counting_proxy(running.local_address, delay_s=0.2) as proxy,
        ChurnClient(proxy.address, timeout=0.5, max_attempts=5) as client,
    ):
        with pytest.raises(DeadlineExceededError) as expired:
            client.predict(FIRST_USER_ID)
        at_deadline = proxy.calls("Predict")
        time.sleep(2.0)  # longer than the whole back-off schedule (0.1 + 0.2 + 0.4 + 0.8 s)
        afterwards = proxy.calls("Predict")

    print(f"retries against the deadline: {at_deadline} attempts, then {expired.value.code.name}")
    assert expired.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= at_deadline < 5, "the deadline, not max_attempts, ended the retries"
    assert afterwards == at_deadline, "no attempt after the deadline"


@dataclass
class BatchLoop:
    """BatchPredicts of `user_ids` back to back on a thread of its own, no retries: every batch is recorded
    with the set of model versions that answered its results, and every failure is kept."""

    address: str
    user_ids: list[str]
    versions: list[set[str]] = field(default_factory=list)
    failures: list[grpc.RpcError] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = pb.BatchPredictRequest(user_ids=self.user_ids)
        with prediction_stub(self.address) as stub:
            while not self._stop.is_set():
                try:
                    response = stub.BatchPredict(request, timeout=60)
                except grpc.RpcError as error:
                    self.failures.append(error)
                    continue
                assert all(r.HasField("prediction") for r in response.results)
                self.versions.append({r.prediction.model.version for r in response.results})

    def wait_for(self, version: str) -> None:
        deadline = time.monotonic() + LIVENESS_TIMEOUT_S
        while not any(seen == {version} for seen in self.versions):
            assert self._thread.is_alive(), "the batch loop died"
            assert time.monotonic() < deadline, f"no batch answered by version {version}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LIVENESS_TIMEOUT_S)
        assert not self._thread.is_alive()


def test_a_batch_in_flight_across_a_promotion_answers_from_one_version(
    fresh_embedded_settings: Settings,
) -> None:
    settings = fresh_embedded_settings
    second = str(train(settings, SNAPSHOT_DATES[-1]).version)
    users = current_users(settings)

    with start_server(settings) as running:
        loop = BatchLoop(running.local_address, users)
        loop.wait_for("1")
        promote(settings, second, "Production", force=True)
        loop.wait_for(second)
        loop.stop()

    sent = len(loop.versions) + len(loop.failures)
    print(f"promotion under batches: {sent} sent, {len(loop.failures)} failed")
    assert loop.failures == []
    mixed = [seen for seen in loop.versions if len(seen) != 1]
    assert mixed == [], f"{len(mixed)} of {len(loop.versions)} batches mixed versions"
    assert set().union(*loop.versions) == {"1", second}


def answered_mid_batch_of(checks: list[tuple[int, int]]) -> list[int]:
    """The statuses of the checks answered while at least one batch was still running."""
    return [status for status, running_batches in checks if running_batches]


def test_health_answers_while_batches_run(embedded_settings: Settings) -> None:
    """Eight 1,000-user batches queued on the two batch threads; health checks sent meanwhile must all
    answer SERVING before their (generous) deadline. Liveness only: latency is the benchmark's business."""
    users = current_users(embedded_settings)
    request = pb.BatchPredictRequest(user_ids=(users * (1000 // len(users) + 1))[:1000])
    with start_server(embedded_settings) as running, grpc.insecure_channel(running.local_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.PredictionServiceStub(channel)
        batches = [stub.BatchPredict.future(request, timeout=LIVENESS_TIMEOUT_S) for _ in range(8)]
        during = []
        while not all(batch.done() for batch in batches):
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=LIVENESS_TIMEOUT_S).status
            during.append((status, sum(not batch.done() for batch in batches)))
        results = [batch.result() for batch in batches]

    print(f"health during batches: {len(during)} checks, {len(answered_mid_batch_of(during))} mid-batch")
    assert [len(r.results) for r in results] == [1000] * 8
    answered_mid_batch = answered_mid_batch_of(during)
    assert answered_mid_batch, "no health check was answered while a batch was still running"
    assert set(answered_mid_batch) == {health_pb2.HealthCheckResponse.SERVING}
