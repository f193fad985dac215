"""The server follows the registry live: promotion and rollback swap models under load, versions the
training pipeline did not produce (or that break) are refused while the old model keeps serving, ModelInfo
says why in a short safe sentence and the log in detail, ModelInfo tells the served version's real stage, and
the watcher survives listeners and polls that raise."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from urllib.parse import urlparse

import grpc
import mlflow
import mlflow.sklearn
import pytest
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from sklearn.linear_model import LogisticRegression

from streamflow.model_contract import TAG_AS_OF, TAG_FEATURE_SERVICE, TAG_FINGERPRINT
from streamflow.server import model_watcher
from streamflow.server.app import PredictionServer
from streamflow.server.loaded_model import LoadedModel
from streamflow.server.model_loader import FAILED_TO_LOAD, ModelTarget
from streamflow.server.model_watcher import ModelWatcher
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.dataset import training_set
from streamflow.training.demo_data import FIRST_USER_ID
from streamflow.training.registry import promote, rollback
from streamflow.training.train import mlflow_client, train
from tests.fixtures.serving import TEST_POLL_INTERVAL_S, prediction_stub, start_server

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


def register_copy(
    settings: Settings, tags: dict[str, str | None] | None = None, run_id: str | None = None
) -> str:
    """A new version with the artifacts and tags of version 1, `tags` replacing its own (None drops one),
    and version 1's run unless another is given."""
    client = mlflow_client(settings)
    source = client.get_model_version(settings.model_name, "1")
    merged = {k: v for k, v in {**source.tags, **(tags or {})}.items() if v is not None}
    created = client.create_model_version(
        settings.model_name, source.source or "", run_id=run_id or source.run_id, tags=merged
    )
    return str(created.version)


def register_copy_without_metrics(settings: Settings) -> str:
    """Version 1's model and tags registered from a new run that logged no validation metrics."""
    client = mlflow_client(settings)
    source = client.get_model_version(settings.model_name, "1")
    run = client.create_run(client.get_run(str(source.run_id)).info.experiment_id)
    client.set_terminated(run.info.run_id)
    return register_copy(settings, run_id=run.info.run_id)


def register_two_feature_model(settings: Settings) -> str:
    """The issue's case: a LogisticRegression fitted on 20 rows with 2 of the 14 features, tagged
    `feature_service=churn_model_v1`, registered straight through MLflow."""
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.model_name)
    assert experiment is not None
    rows = training_set(settings, date(2024, 1, 31)).head(20)
    features = rows[["months_active", "monthly_fee"]]
    model = LogisticRegression().fit(features, rows["churned"].astype(int))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        signature = infer_signature(features, model.predict(features))
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        # Explicit requirements: inferring them starts a subprocess that costs more than the rest of the test.
        logged = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=signature,
            registered_model_name=settings.model_name,
            pip_requirements=["scikit-learn"],
        )
    version = str(logged.registered_model_version)
    client.set_model_version_tag(settings.model_name, version, TAG_FEATURE_SERVICE, "churn_model_v1")
    return version


def register_copy_without_files(settings: Settings) -> str:
    """A copy of version 1 whose model files are gone: loading it fails with an exception naming a path."""
    version = register_copy(settings)
    client = mlflow_client(settings)
    source = str(client.get_model_version(settings.model_name, version).source)  # models:/m-<logged model id>
    logged = client.get_logged_model(source.split("/")[-1])
    shutil.rmtree(urlparse(logged.artifact_location).path)
    return version


def move_straight_to_production(settings: Settings, version: str) -> None:
    """Production through MLflow itself, as anyone with registry access can, bypassing `promote`'s gate."""
    client = mlflow_client(settings)
    client.transition_model_version_stage(
        settings.model_name, version, "Production", archive_existing_versions=True
    )
    client.set_registered_model_alias(settings.model_name, "production", version)


def test_promotion_and_rollback_swap_the_model_while_calls_keep_succeeding(
    live: tuple[Settings, PredictionServer, PredictLoop],
) -> None:
    settings, running, loop = live
    with prediction_stub(running.local_address) as stub:
        first = model_info(stub)
        trained = train(settings, date(2024, 2, 29))
        promote(settings, trained.version, "Production", force=True)
        # promote moves the stage, then the aliases: the load may have resolved the version between the two
        # writes, and the next poll reports the alias.
        wait_for(
            lambda: (
                ((info := model_info(stub)).model.version, _state(info))
                == (str(trained.version), ("Production", ["production"]))
            ),
            "the promoted version serves, in Production with its alias",
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


def refuse(
    settings: Settings, running: PredictionServer, register: Callable[[Settings], str]
) -> tuple[str, pb.ModelInfoResponse]:
    """Register a version with `register`, move it straight to Production, and wait until the server reports
    refusing it: (its version, the ModelInfo then)."""
    with prediction_stub(running.local_address) as stub:
        broken = register(settings)
        move_straight_to_production(settings, broken)
        wait_for(lambda: model_info(stub).HasField("last_reload_failure"), "ModelInfo reports the refusal")
        return broken, model_info(stub)


@pytest.mark.parametrize(
    ("register", "reason", "logged"),
    [
        (
            lambda s: register_copy(s, {TAG_FEATURE_SERVICE: "churn_model_v9"}),
            "its feature_service tag names no FeatureService this server can serve",
            "FeatureService 'churn_model_v9' does not resolve",
        ),
        (
            register_two_feature_model,
            "its inputs do not match FeatureService churn_model_v1",
            "signature does not match FeatureService churn_model_v1: paperless_billing (boolean) missing;",
        ),
        (
            lambda s: register_copy(s, {TAG_FINGERPRINT: None}),
            "it lacks the training pipeline's provenance: no training_set_fingerprint tag",
            "it lacks the training pipeline's provenance: no training_set_fingerprint tag",
        ),
        (
            lambda s: register_copy(s, {TAG_AS_OF: "last week"}),
            "it lacks the training pipeline's provenance: no as_of date tag",
            "it lacks the training pipeline's provenance: no as_of date tag",
        ),
        (
            register_copy_without_metrics,
            "it lacks the training pipeline's provenance: no val_auc metric",
            "it lacks the training pipeline's provenance: no val_auc metric",
        ),
    ],
    ids=[
        "missing-feature-service",
        "two-feature-model",
        "no-fingerprint",
        "bad-as-of",
        "no-metrics",
    ],
)
def test_a_version_training_did_not_produce_or_that_breaks_is_refused_and_the_old_one_keeps_serving(
    live: tuple[Settings, PredictionServer, PredictLoop],
    caplog: pytest.LogCaptureFixture,
    register: Callable[[Settings], str],
    reason: str,
    logged: str,
) -> None:
    settings, running, loop = live
    broken, refused = refuse(settings, running, register)
    calls_after_refusal = len(loop.versions)
    wait_for(lambda: len(loop.versions) > calls_after_refusal, "a Predict after the refusal")

    assert refused.model.version == "1"
    assert refused.last_reload_failure.model_version == broken
    # A fixed sentence: no exception text, class name or path, whatever the cause.
    assert refused.last_reload_failure.reason == reason
    refusals = [
        r for r in caplog.records if r.getMessage().startswith(f"refused streamflow_churn version {broken}")
    ]
    assert len(refusals) == 1  # once, though the watcher polled many times since
    assert refusals[0].levelno == logging.ERROR
    assert logged in caplog.text
    assert loop.failures == []
    assert set(loop.versions) == {"1"}
    assert running.predictor.watcher.current is not None
    assert running.predictor.watcher.current.ref.version == "1"


def test_an_unexpected_refusal_keeps_its_detail_in_the_log_only(
    live: tuple[Settings, PredictionServer, PredictLoop], caplog: pytest.LogCaptureFixture
) -> None:
    settings, running, _ = live
    broken, refused = refuse(settings, running, register_copy_without_files)

    refusal = next(
        r for r in caplog.records if r.getMessage().startswith(f"refused streamflow_churn version {broken}")
    )
    assert refusal.exc_info is not None  # the log has the exception and its traceback
    detail = str(refusal.exc_info[1])
    assert str(settings.home) in caplog.text  # ... including the path that could not be read
    reason = refused.last_reload_failure.reason
    assert reason == FAILED_TO_LOAD
    assert detail not in reason and type(refusal.exc_info[1]).__name__ not in reason
    assert str(settings.home) not in str(refused)  # nowhere in the ModelInfo response


def test_a_listener_that_raises_is_logged_and_the_watcher_keeps_following_the_registry(
    live: tuple[Settings, PredictionServer, PredictLoop], caplog: pytest.LogCaptureFixture
) -> None:
    settings, running, loop = live
    swaps: list[str] = []

    def broken_listener(model: LoadedModel) -> None:
        swaps.append(model.ref.version)
        if model.ref.version != "1":  # subscribing calls it at once, on this thread, with version 1
            raise RuntimeError("listener bug")

    running.predictor.watcher.subscribe(broken_listener)
    assert swaps == ["1"]
    with prediction_stub(running.local_address) as stub:
        second = register_copy(settings)
        move_straight_to_production(settings, second)
        wait_for(lambda: model_info(stub).model.version == second, "the promoted version serves")
        wait_for(lambda: loop.versions[-1] == second, "a Predict answered by the promoted version")
        third = register_copy(settings)
        move_straight_to_production(settings, third)
        wait_for(lambda: model_info(stub).model.version == third, "the next promotion serves too")
        wait_for(lambda: loop.versions[-1] == third, "a Predict answered by the next promotion")

    assert swaps == ["1", second, third]
    failures = [r for r in caplog.records if "a listener of model swaps failed" in r.getMessage()]
    assert [r.getMessage().rsplit(" version ", 1)[1].split(";")[0] for r in failures] == [second, third]
    assert all(r.exc_info is not None and "listener bug" in str(r.exc_info[1]) for r in failures)
    assert running.predictor.watcher.alive
    assert loop.failures == []


def test_a_poll_that_raises_is_logged_once_and_retried_with_back_off(
    live: tuple[Settings, PredictionServer, PredictLoop],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stand-in: nothing real makes the post-load heap settling fail on demand, so it fails here three
    times (outside every guard of `poll`, where a listener's or the settling's exception used to end the
    watcher thread for good)."""
    settings, running, loop = live
    caplog.set_level(logging.INFO, logger=model_watcher.__name__)
    failures_left = [3]
    settle = model_watcher.settle_after_load

    def failing_settle() -> None:
        if failures_left[0] > 0:
            failures_left[0] -= 1
            raise MemoryError("cannot settle the heap")
        settle()

    monkeypatch.setattr(model_watcher, "settle_after_load", failing_settle)
    with prediction_stub(running.local_address) as stub:
        second = register_copy(settings)
        move_straight_to_production(settings, second)
        wait_for(lambda: model_info(stub).model.version == second, "the version serves once polls succeed")
        wait_for(lambda: loop.versions[-1] == second, "a Predict answered by it")

    assert failures_left == [0]
    messages = [r.getMessage() for r in caplog.records if r.name == model_watcher.__name__]
    failed = [m for m in messages if m.startswith("the model watcher failed to poll")]
    assert failed == [
        "the model watcher failed to poll models:/streamflow_churn/Production; "
        "still serving version 1, retrying with back-off"
    ]
    assert (
        messages.count(
            "the model watcher polls models:/streamflow_churn/Production again after 3 failed polls"
        )
        == 1
    )
    assert running.predictor.watcher.alive
    assert loop.failures == []
    assert set(loop.versions) <= {"1", second}


def test_a_watcher_thread_that_dies_is_replaced(
    live: tuple[Settings, PredictionServer, PredictLoop], caplog: pytest.LogCaptureFixture
) -> None:
    """A listener raising SystemExit escapes every per-poll guard and ends the thread itself."""
    settings, running, loop = live
    watcher = running.predictor.watcher
    assert isinstance(watcher, ModelWatcher)  # a single-process server follows the registry itself
    exits = [0]

    def exiting_listener(model: LoadedModel) -> None:
        if model.ref.version != "1" and exits[0] == 0:
            exits[0] += 1
            raise SystemExit(3)

    watcher.subscribe(exiting_listener)
    first_thread = watcher._thread
    with prediction_stub(running.local_address) as stub:
        second = register_copy(settings)
        move_straight_to_production(settings, second)
        wait_for(lambda: watcher._thread is not first_thread, "a new watcher thread")
        third = register_copy(settings)
        move_straight_to_production(settings, third)
        wait_for(lambda: model_info(stub).model.version == third, "the replacement thread loads a promotion")
        wait_for(lambda: loop.versions[-1] == third, "a Predict answered by it")

    assert exits == [1]
    assert first_thread is not None and not first_thread.is_alive()
    assert watcher.alive
    assert caplog.text.count("the model watcher thread ended unexpectedly; starting a new one") == 1
    assert loop.failures == []


def _state(info: pb.ModelInfoResponse) -> tuple[str, list[str]]:
    return info.stage, list(info.aliases)


def test_a_stage_resolves_to_the_version_it_holds_when_a_promotion_falls_between_the_two_reads(
    fresh_embedded_settings: Settings,
) -> None:
    """A stage is resolved by a search, then a direct read of the version found. A promotion between the two
    archived the version found; answering it, Archived, made a one-process server report the version it
    served in stage Archived for a poll (a CI run's flaky metrics test)."""
    settings = fresh_embedded_settings
    mlflow_client(settings)  # the home's registry folder
    newer = register_copy(settings)

    class PromotedBetweenTheReads(MlflowClient):
        """A real registry client, under which `newer` reaches Production right after the search."""

        promoted = False

        def get_model_version(self, name: str, version: str) -> ModelVersion:
            if not self.promoted:
                self.promoted = True
                move_straight_to_production(settings, newer)
            return super().get_model_version(name, version)

    client = PromotedBetweenTheReads(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    resolved = ModelTarget.parse(settings.model_uri).resolve(client)
    assert resolved is not None
    assert (str(resolved.version), resolved.current_stage, resolved.aliases) == (
        newer,
        "Production",
        ["production"],
    )


def test_model_info_follows_the_served_version_out_of_production_and_back(
    live: tuple[Settings, PredictionServer, PredictLoop], caplog: pytest.LogCaptureFixture
) -> None:
    settings, running, loop = live
    caplog.set_level(logging.INFO, logger=model_watcher.__name__)
    client = mlflow_client(settings)
    with prediction_stub(running.local_address) as stub:
        promote(settings, 1, "Staging", force=True)  # leaves no Production
        # promote moves the stage, then the aliases: a poll can fall between the two writes.
        wait_for(
            lambda: _state(model_info(stub)) == ("Staging", ["staging"]),
            "ModelInfo reports the new stage and aliases",
        )
        staged = model_info(stub)
        # Another registry change to the served version, seen only through polls made while unresolved.
        client.set_registered_model_alias(settings.model_name, "canary", "1")
        wait_for(lambda: "canary" in model_info(stub).aliases, "ModelInfo reports the new alias")
        calls_while_unresolved = len(loop.versions)
        wait_for(
            lambda: len(loop.versions) > calls_while_unresolved, "a Predict while nothing is in Production"
        )

        promote(settings, 1, "Production")
        wait_for(
            lambda: _state(model_info(stub)) == ("Production", ["canary", "production"]),
            "ModelInfo reports Production and its aliases again",
        )
        restored = model_info(stub)

    assert (staged.model.version, list(staged.aliases)) == ("1", ["staging"])
    assert not staged.HasField("last_reload_failure")
    assert (restored.model.version, list(restored.aliases)) == ("1", ["canary", "production"])
    assert restored.loaded_at == staged.loaded_at  # the same load throughout: nothing was reloaded
    messages = [r.getMessage() for r in caplog.records if r.name == model_watcher.__name__]
    assert (
        messages.count(
            "models:/streamflow_churn/Production no longer points at any version; "
            "still serving version 1, now in stage Staging"
        )
        == 1
    )
    assert messages.count("models:/streamflow_churn/Production points at version 1 again") == 1
    assert loop.failures == []
    assert set(loop.versions) == {"1"}
