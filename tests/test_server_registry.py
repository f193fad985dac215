"""The server follows the registry live: promotion and rollback swap models under load, broken versions are
refused while the old model keeps serving, and ModelInfo says why."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date

import grpc
import mlflow
import mlflow.sklearn
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from client.generated.streamflow.serving.v1 import prediction_service_pb2 as pb
from client.generated.streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from server.app import PredictionServer
from streamflow.settings import Settings
from tests.fixtures.serving import TEST_POLL_INTERVAL_S, prediction_stub, start_server
from training.demo_data import FIRST_USER_ID
from training.registry import promote, rollback
from training.train import TAG_AS_OF, TAG_FEATURE_SERVICE, mlflow_client, train

SWAP_BOUND_S = TEST_POLL_INTERVAL_S + 30.0
"""How long a test waits for the server to act on a registry change before failing; a bound, not a budget."""


@dataclass
class PredictLoop:
    """Calls Predict back to back on its own thread, recording which version answered and every failure."""

    stub: pb_grpc.PredictionServiceStub
    versions: list[str] = field(default_factory=list)
    failures: list[grpc.RpcError] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                response = self.stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=30)
                self.versions.append(response.prediction.model.version)
            except grpc.RpcError as error:
                self.failures.append(error)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SWAP_BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SWAP_BOUND_S:.0f} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def live(fresh_embedded_settings: Settings) -> Iterator[tuple[Settings, PredictionServer, PredictLoop]]:
    """A server on a private home and a Predict loop against it for the whole test."""
    with start_server(fresh_embedded_settings) as running, prediction_stub(running.local_address) as stub:
        loop = PredictLoop(stub)
        thread = threading.Thread(target=loop.run, name="predict-loop")
        thread.start()
        try:
            yield fresh_embedded_settings, running, loop
        finally:
            loop.stopping.set()
            thread.join()


def model_info(stub: pb_grpc.PredictionServiceStub) -> pb.ModelInfoResponse:
    response: pb.ModelInfoResponse = stub.ModelInfo(pb.ModelInfoRequest())
    return response


def register_copy(settings: Settings, of_version: str, feature_service: str) -> str:
    """A new version with the artifacts of `of_version` and the given FeatureService tag."""
    client = mlflow_client(settings)
    source = client.get_model_version(settings.model_name, of_version)
    created = client.create_model_version(
        settings.model_name,
        source.source or "",
        run_id=source.run_id,
        tags={TAG_FEATURE_SERVICE: feature_service, TAG_AS_OF: source.tags[TAG_AS_OF]},
    )
    return str(created.version)


def register_unscorable(settings: Settings) -> str:
    """A new version whose model was fitted on two unnamed columns: it loads but cannot score the features."""
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.model_name)
    assert experiment is not None
    model = LogisticRegression().fit(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0, 1]))
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        # Explicit requirements: inferring them starts a subprocess that costs more than the rest of the test.
        logged = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=settings.model_name, pip_requirements=["scikit-learn"]
        )
    version = str(logged.registered_model_version)
    client.set_model_version_tag(settings.model_name, version, TAG_FEATURE_SERVICE, "churn_model_v1")
    client.set_model_version_tag(settings.model_name, version, TAG_AS_OF, "2024-01-31")
    return version


def test_promotion_and_rollback_swap_the_model_while_calls_keep_succeeding(
    live: tuple[Settings, PredictionServer, PredictLoop],
) -> None:
    settings, running, loop = live
    with prediction_stub(running.local_address) as stub:
        first = model_info(stub)
        trained = train(settings, date(2024, 2, 29))
        promote(settings, trained.version, "Production", force=True)
        wait_for(
            lambda: model_info(stub).model.version == str(trained.version), "the promoted version serves"
        )
        promoted = model_info(stub)
        wait_for(lambda: str(trained.version) in loop.versions, "a Predict answered by the promoted version")

        rollback(settings)
        wait_for(lambda: model_info(stub).model.version == "1", "the rolled-back version serves")
        rolled_back = model_info(stub)
        wait_for(lambda: loop.versions[-1] == "1", "a Predict answered by the rolled-back version")

    assert loop.failures == []
    assert (
        first.model.version == "1" and first.stage == "Production" and list(first.aliases) == ["production"]
    )
    assert promoted.stage == "Production" and list(promoted.aliases) == ["production"]
    assert promoted.training_as_of == "2024-02-29"
    assert promoted.run_id == trained.run_id
    assert promoted.metrics["val_auc"] == pytest.approx(trained.metrics["val_auc"])
    assert promoted.loaded_at.ToDatetime() > first.loaded_at.ToDatetime()
    assert rolled_back.loaded_at.ToDatetime() > promoted.loaded_at.ToDatetime()
    assert not rolled_back.HasField("last_reload_failure")
    # Versions only move forward through the swaps: 1 ... 1, 2 ... 2, 1 ... 1.
    changes = [v for i, v in enumerate(loop.versions) if i == 0 or v != loop.versions[i - 1]]
    assert changes == ["1", str(trained.version), "1"]


@pytest.mark.parametrize(
    ("register", "reason"),
    [
        (
            lambda s: register_copy(s, "1", "churn_model_v9"),
            "FeatureService 'churn_model_v9' does not resolve",
        ),
        (register_unscorable, "smoke prediction failed"),
    ],
    ids=["missing-feature-service", "cannot-predict"],
)
def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(
    live: tuple[Settings, PredictionServer, PredictLoop], register: Callable[[Settings], str], reason: str
) -> None:
    settings, running, loop = live
    with prediction_stub(running.local_address) as stub:
        broken = register(settings)
        promote(settings, broken, "Production", force=True)
        wait_for(lambda: model_info(stub).HasField("last_reload_failure"), "ModelInfo reports the refusal")
        refused = model_info(stub)
        calls_after_refusal = len(loop.versions)
        wait_for(lambda: len(loop.versions) > calls_after_refusal, "a Predict after the refusal")

    assert refused.model.version == "1"
    assert refused.last_reload_failure.model_version == broken
    assert reason in refused.last_reload_failure.reason
    assert loop.failures == []
    assert set(loop.versions) == {"1"}
    assert running.predictor.watcher.current is not None
    assert running.predictor.watcher.current.ref.version == "1"
