"""The production profile's MLflow tracking server: started by the make target's module, used over HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from feast.infra.registry.sql import SqlRegistry
from sqlalchemy.pool import QueuePool

from streamflow import mlflow_server, postgres
from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import FEATURE_SERVICE_NAME
from streamflow.server.model_watcher import ModelWatcher
from streamflow.settings import Settings
from streamflow.training.bootstrap import bootstrap
from tests.fixtures.metrics import eventually
from tests.fixtures.production import MlflowService, ProductionStack, free_port

pytestmark = pytest.mark.production


def rest(url: str, endpoint: str, **params: str) -> dict[str, Any]:
    """GET one endpoint of MLflow's REST API, as any HTTP client would."""
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{query}", timeout=10) as response:
        return dict(json.load(response))


def test_make_target_reports_a_ready_server_on_a_postgres_backend(mlflow_service: MlflowService) -> None:
    backend = postgres.describe(mlflow_service.backend_dsn)

    assert mlflow_service.output.startswith(
        f"MLflow server ready at {mlflow_service.url} "
        f"(backend {backend}, artifacts {mlflow_service.artifacts});"
    )
    assert backend.endswith("_mlflow")
    with postgres.connect(mlflow_service.backend_dsn) as conn:
        # MLflow's schema was created in the database the target made for it.
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    # No job runner (and its huey consumers) beside the server: nothing here submits MLflow jobs.
    processes = psutil.Process(mlflow_service.pid).children(recursive=True)
    assert not [p.cmdline() for p in processes if "mlflow.server.jobs" in " ".join(p.cmdline())]
    # A second `make mlflow-server` finds it running instead of starting another.
    again = subprocess.run(
        [sys.executable, "-m", "streamflow.mlflow_server"],
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": mlflow_service.url,
            "STREAMFLOW_HOME": str(mlflow_service.home),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (again.returncode, again.stdout) == (0, f"MLflow server already running at {mlflow_service.url}\n")


def test_training_registers_over_http_with_artifacts_served_by_the_server(
    production_stack: ProductionStack,
) -> None:
    settings, mlflow = production_stack.settings, production_stack.mlflow
    version = production_stack.report.production_version

    model = rest(mlflow.url, "registered-models/get", name=settings.model_name)["registered_model"]
    assert {"alias": "production", "version": str(version)} in model["aliases"]
    production = [v["version"] for v in model["latest_versions"] if v["current_stage"] == "Production"]
    assert production == [str(version)]
    details = rest(mlflow.url, "model-versions/get", name=settings.model_name, version=str(version))
    tags = {tag["key"]: tag["value"] for tag in details["model_version"]["tags"]}
    assert tags["feature_service"] == FEATURE_SERVICE_NAME and tags["as_of"] == "2024-01-31"
    run = rest(mlflow.url, "runs/get", run_id=details["model_version"]["run_id"])["run"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["as_of"] == "2024-01-31"
    assert {m["key"] for m in run["data"]["metrics"]} >= {"val_auc", "val_f1", "training_time_s"}
    # Artifacts went through the server (mlflow-artifacts:/) into its destination, not to a client-side path.
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    assert list(mlflow.artifacts.rglob("MLmodel")), "the model's files are in the server's artifact folder"
    with postgres.connect(mlflow.backend_dsn) as conn:
        registered = conn.execute(
            "SELECT name FROM registered_models WHERE name = %s", (settings.model_name,)
        )
        assert registered.fetchall() == [(settings.model_name,)]


def test_a_second_bootstrap_finds_everything_in_place(production_stack: ProductionStack) -> None:
    report = bootstrap(production_stack.settings)

    assert (report.materialized, report.trained_version) == (False, None)
    assert report.production_version == production_stack.report.production_version
    assert report.data_fingerprint == production_stack.report.data_fingerprint


def test_a_server_that_cannot_start_is_reported_with_its_log(mlflow_backend: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = mlflow_server.start(
            host="127.0.0.1",
            port=port,
            backend_dsn=mlflow_server.backend_store_dsn(Settings(postgres_dsn=mlflow_backend)),
            artifacts_destination=str(tmp_path / "artifacts"),
            log_path=tmp_path / "server.log",
        )
        with pytest.raises(StreamflowError) as exc:
            mlflow_server.wait_until_ready(server)

    message = str(exc.value)
    assert re.match(
        r"mlflow server exited with code \d+ before it was ready; its log \(.*server\.log\) ends with",
        message,
    )
    assert "address already in use" in message.lower()


def test_an_unreachable_backend_database_is_one_clear_error(tmp_path: Path) -> None:
    port = free_port()

    result = subprocess.run(
        [sys.executable, "-m", "streamflow.mlflow_server", "--port", str(free_port())],
        env={
            **os.environ,
            "STREAMFLOW_HOME": str(tmp_path),
            "STREAMFLOW_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{port}/streamflow",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: cannot reach PostgreSQL at 127.0.0.1:{port}/streamflow_mlflow for the MLflow backend store: "
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow-server" / "server.pid").exists()


def test_a_stopped_watcher_leaves_no_registry_connection_open(production_stack: ProductionStack) -> None:
    """The watcher's Feast store lives as long as the watcher; stopping it closes the SQL registry's pooled
    connections, which Feast would leave to the garbage collector (`close_store`)."""
    watcher = ModelWatcher(production_stack.settings)
    watcher.start()
    try:
        eventually(lambda: watcher.current is not None, "the watcher loads the Production model")
        registry = watcher._feature_store().registry  # the one it resolved the model's FeatureService with
        assert isinstance(registry, SqlRegistry)
        pool = registry.write_engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.checkedin() >= 1
    finally:
        watcher.stop()
    assert pool.checkedin() == 0
