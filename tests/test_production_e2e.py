"""The production profile end to end: PostgreSQL snapshots, Redis features, the MLflow registry, gRPC.

The serving issue's scenario (bootstrap, Predict, unknown user, promote -> live swap, rollback) on the real
services, then the faults: Redis stopping mid-run, the MLflow server stopping under the image's ENTRYPOINT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import redis
from mlflow import MlflowClient

from streamflow import healthcheck, postgres
from streamflow.client import (
    ChurnClient,
    ChurnServiceError,
    EntityNotFoundError,
    ModelRef,
    ServiceUnavailableError,
)
from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import FEATURE_NAMES, SNAPSHOT_DATES
from streamflow.settings import Settings
from streamflow.training import demo_data
from streamflow.training.ingest import TABLES
from streamflow.training.registry import promote, rollback
from streamflow.training.train import train
from tests.fixtures.deploy import serving_image, serving_only_environment
from tests.fixtures.processes import serve_env, serving_process
from tests.fixtures.production import ProductionStack, free_port, running_mlflow_server, start_private_redis
from tests.fixtures.serving import start_server

pytestmark = pytest.mark.production

USER = "7590-VHVEG"
UNKNOWN_USER = "9999-99999"
_T = TypeVar("_T")


def eventually(attempt: Callable[[], _T], what: str, timeout_s: float = 60.0) -> _T:
    """attempt()'s first result not raising AssertionError or UNAVAILABLE, polling until timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return attempt()
        except (AssertionError, grpc.RpcError, ServiceUnavailableError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last: {error!r}") from None
            time.sleep(0.2)


def production_version(settings: Settings) -> str:
    """The Production version as the MLflow server's REST API shows it to any HTTP client."""
    url = f"{settings.tracking_uri}/api/2.0/mlflow/registered-models/get?name={settings.model_name}"
    with urllib.request.urlopen(url, timeout=10) as response:
        model = json.load(response)["registered_model"]
    (version,) = [v["version"] for v in model["latest_versions"] if v["current_stage"] == "Production"]
    return str(version)


@pytest.fixture
def private_model(production_stack: ProductionStack) -> Iterator[Settings]:
    """The stack's data and MLflow server under a registered model of this test's own, version 1 (trained at
    the first snapshot, as bootstrap does) in Production: the scenario promotes and rolls back without
    changing the registry state the other production tests read. The model is deleted afterwards."""
    name = f"churn_{uuid.uuid4().hex[:12]}"
    settings = production_stack.settings.model_copy(
        update={"model_name": name, "model_uri": f"models:/{name}/Production"}
    )
    promote(settings, str(train(settings, SNAPSHOT_DATES[0]).version), "Production", force=True)
    try:
        yield settings
    finally:
        client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        client.delete_registered_model(name)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            client.delete_experiment(experiment.experiment_id)


@dataclass
class SteadyCaller:
    """Predicts one user back to back on a thread of its own, with no client retries (max_attempts=1), so
    every call the server drops or refuses is counted, not hidden."""

    address: str
    versions: list[str] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with ChurnClient(self.address, timeout=30, max_attempts=1) as client:
            while not self._stop.is_set():
                try:
                    self.versions.append(client.predict(USER).model.version)
                except (ChurnServiceError, grpc.RpcError) as error:
                    self.failures.append(error)

    def wait_for(self, version: str, after: int, timeout_s: float = 120.0) -> int:
        """The index of the first call after call `after` answered by `version` (bounded: liveness only)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = self.versions[after:]
            if version in seen:
                return after + seen.index(version)
            assert self._thread.is_alive(), "the calling thread died"
            time.sleep(0.05)
        raise AssertionError(f"no call was answered by version {version} within {timeout_s} s")

    def stop(self) -> int:
        """Stop calling; the number of calls sent."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "a call hung past its 30 s deadline"
        return len(self.versions) + len(self.failures)


def test_scenario_reads_redis_and_postgres_and_follows_the_registry_over_http(
    private_model: Settings,
) -> None:
    settings = private_model
    tables = demo_data.generate_tables(settings.users, settings.seed)
    feb = demo_data.snapshot_timestamp(SNAPSHOT_DATES[-1])
    with postgres.connect(settings.postgres_dsn) as conn:
        rows = {table: conn.execute(f'SELECT count(*) FROM "{table}"').fetchone() for table in TABLES}
        fee = conn.execute(
            "SELECT monthly_fee FROM subscriptions_profile_snapshots WHERE user_id = %s AND as_of = %s",
            (USER, feb.to_pydatetime()),
        ).fetchone()
    assert rows == {table: (len(frame),) for table, frame in tables.items()}
    users = set().union(*(set(frame["user_id"]) for frame in tables.values()))
    keys = list(
        redis.Redis.from_url(settings.redis_url).scan_iter(match=b"*" + settings.redis_key_prefix.encode())
    )
    assert len(keys) == len(users), "one Redis hash per user, under this project"
    first = production_version(settings)

    with start_server(settings) as running, ChurnClient(running.local_address) as client:
        assert healthcheck.check(running.local_address) == "SERVING"
        prediction = client.predict(USER)
        assert prediction.model == ModelRef(settings.model_name, first)
        features = {f.name: f for f in prediction.features}
        assert list(features) == list(FEATURE_NAMES)
        # The value PostgreSQL holds for the latest snapshot, materialized to Redis and served from there.
        assert (features["monthly_fee"].value,) == fee
        assert features["monthly_fee"].event_time == feb.to_pydatetime()

        with pytest.raises(EntityNotFoundError) as unknown:
            client.predict(UNKNOWN_USER)
        assert (unknown.value.code, unknown.value.reason) == (grpc.StatusCode.NOT_FOUND, "ENTITY_NOT_FOUND")
        assert unknown.value.user_id == UNKNOWN_USER
        assert set(unknown.value.missing_features) == set(FEATURE_NAMES)

        # From here to the end of the rollback one caller never stops: no call may fail during either swap.
        caller = SteadyCaller(running.local_address)
        second = str(train(settings, SNAPSHOT_DATES[-1]).version)
        promote(settings, second, "Production", force=True)
        assert production_version(settings) == second
        swapped = caller.wait_for(second, after=0)
        assert client.model_info().model.version == second

        rollback(settings)
        assert production_version(settings) == first
        caller.wait_for(first, after=swapped)
        assert client.model_info().model.version == first
        sent = caller.stop()
        assert client.predict(USER).churn_probability == prediction.churn_probability

    assert caller.failures == [], f"{len(caller.failures)} of {sent} calls failed during the swaps"
    assert set(caller.versions) == {first, second}
    print(f"swap scenario: {sent} Predicts sent, {len(caller.failures)} failed")


def test_redis_stopping_mid_run_is_unavailable_and_service_recovers(
    production_stack: ProductionStack, tmp_path: Path
) -> None:
    with start_private_redis(tmp_path / "redis") as private:
        # The same registry and offline store, materialized into a Redis of the test's own that it may stop.
        settings = production_stack.settings.model_copy(update={"redis_url": private.url})
        store.open_store(settings).materialize(*store.materialization_window())
        with start_server(settings) as running, ChurnClient(running.local_address, max_attempts=1) as client:
            before = client.predict(USER)

            private.stop()
            with pytest.raises(ServiceUnavailableError) as outage:
                client.predict(USER)
            with pytest.raises(ServiceUnavailableError) as batch_outage:
                client.batch_predict([USER, UNKNOWN_USER])

            private.start()
            after = eventually(lambda: client.predict(USER), "predictions once Redis is back")

    for error in (outage.value, batch_outage.value):
        # A typed, retryable answer, not UNKNOWN: the whole read failed, so the whole call does.
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert (error.reason, error.metadata) == ("FEATURE_STORE_UNAVAILABLE", {"onlineStore": "redis"})
    assert after == before


def _registry_unreachable_logged(log: Path, after: int) -> None:
    assert "registry unreachable" in log.read_text()[after:]


def test_image_entrypoint_keeps_serving_and_healthy_while_the_mlflow_server_is_down(
    production_stack: ProductionStack, tmp_path: Path
) -> None:
    """The Dockerfile's ENTRYPOINT and HEALTHCHECK, run as declared (the venv standing in for the image's
    PATH, imports limited to the image's packages), against an MLflow server the test then stops."""
    settings, image = production_stack.settings, serving_image()
    port = free_port()
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMFLOW_", "MLFLOW_"))}
    with running_mlflow_server(
        production_stack.mlflow.backend_dsn, production_stack.mlflow.artifacts, tmp_path / "mlflow.log"
    ) as mlflow:
        env = {
            **outside,
            **image.env,
            **serving_only_environment(tmp_path / "image"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{outside.get('PATH', '')}",
            "STREAMFLOW_HOME": str(tmp_path / "home"),
            "STREAMFLOW_HOST": "127.0.0.1",
            "STREAMFLOW_PORT": str(port),
            # The image's fixed health port, which its HEALTHCHECK probes, made free for this run.
            "STREAMFLOW_HEALTH_PORT": str(free_port()),
            "STREAMFLOW_POSTGRES_DSN": settings.postgres_dsn,
            "STREAMFLOW_REDIS_URL": settings.redis_url,
            "STREAMFLOW_REDIS_KEY_PREFIX": settings.redis_key_prefix,
            "STREAMFLOW_POLL_INTERVAL_S": "0.5",
            "STREAMFLOW_REGISTRY_TIMEOUT_S": "2",
            "MLFLOW_TRACKING_URI": mlflow.url,
        }
        log = tmp_path / "server.log"

        def health() -> int:
            return subprocess.run(
                image.healthcheck, env=env, capture_output=True, timeout=30, check=False
            ).returncode

        with log.open("wb") as output:
            server = subprocess.Popen(image.entrypoint, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:

            def healthy() -> None:
                assert server.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
                assert health() == 0

            eventually(healthy, "the HEALTHCHECK command to pass", timeout_s=180)
            with ChurnClient(f"127.0.0.1:{port}") as client:
                before = client.predict(USER)

                # Measured first: the watcher may meet the outage (and log it, once) while stop() waits.
                seen = len(log.read_text())
                mlflow.stop()
                eventually(lambda: _registry_unreachable_logged(log, seen), "the poller to meet the outage")
                during = client.predict(USER)
                assert health() == 0, "health stays SERVING while the registry is away"

            server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    assert during == before
    assert during.model == ModelRef(settings.model_name, str(production_stack.report.production_version))
    assert health() == 1, "after SIGTERM nothing answers the HEALTHCHECK"
    assert "Traceback" not in log.read_text()


def test_a_hung_mlflow_server_is_bounded_and_serving_goes_on(
    production_stack: ProductionStack, tmp_path: Path
) -> None:
    """SIGSTOP freezes the real MLflow server: the kernel still accepts connections, nothing answers them,
    the way a hung server behaves (a stopped one refuses at once). The watcher's calls must give up after
    STREAMFLOW_REGISTRY_TIMEOUT_S, the outage and the recovery be logged once each, and every Predict
    (no client retries) be answered by the loaded model meanwhile."""
    settings = production_stack.settings
    with running_mlflow_server(
        production_stack.mlflow.backend_dsn, production_stack.mlflow.artifacts, tmp_path / "mlflow.log"
    ) as mlflow:
        env = serve_env(
            STREAMFLOW_PROFILE="production",
            STREAMFLOW_HOME=str(tmp_path / "home"),
            STREAMFLOW_HOST="127.0.0.1",
            STREAMFLOW_PORT="0",
            STREAMFLOW_POSTGRES_DSN=settings.postgres_dsn,
            STREAMFLOW_REDIS_URL=settings.redis_url,
            STREAMFLOW_REDIS_KEY_PREFIX=settings.redis_key_prefix,
            STREAMFLOW_POLL_INTERVAL_S="0.5",
            STREAMFLOW_REGISTRY_TIMEOUT_S="1",
            MLFLOW_TRACKING_URI=mlflow.url,
        )
        log = tmp_path / "server.log"
        sent, failures = 0, []
        with serving_process(env, log) as (_, address), ChurnClient(address, max_attempts=1) as client:
            eventually(lambda: _assert_serving(address), "the server to load its model", timeout_s=180)
            before = client.predict(USER)
            os.killpg(mlflow.process.pid, signal.SIGSTOP)
            try:
                # Predict all along, until the outage is logged (bounded: MLflow's own default is 120 s x 7).
                deadline = time.monotonic() + 60
                while sent < 100 or "registry unreachable" not in log.read_text():
                    assert time.monotonic() < deadline, "the hung registry was never noticed"
                    sent += 1
                    try:
                        assert client.predict(USER) == before
                    except ChurnServiceError as error:
                        failures.append(error)
                health_during = healthcheck.check(address)
            finally:
                os.killpg(mlflow.process.pid, signal.SIGCONT)
            eventually(lambda: _logged(log, "registry reachable again"), "the watcher to see MLflow again")

    print(f"hung MLflow: {sent} Predicts sent, {len(failures)} failed")
    assert failures == []
    assert sent > 0
    assert health_during == "SERVING"
    text = log.read_text()
    assert (text.count("registry unreachable"), text.count("registry reachable again")) == (1, 1)
    assert "Traceback" not in text


def _assert_serving(address: str) -> None:
    assert healthcheck.check(address) == "SERVING"


def _logged(log: Path, line: str) -> None:
    assert line in log.read_text()
