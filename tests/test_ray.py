"""STREAMFLOW_COMPUTE=ray: Feast's Ray offline store and Ray materialization give what the local engine gives,
and score-all on Ray Data writes what the local run writes, even when a scoring worker is killed mid-job.

One Ray instance (2 CPUs, no dashboard) serves the module: starting Ray takes seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pandas as pd
import psutil
import pytest
import ray
import redis

from streamflow import postgres
from streamflow.batch.score_all import score_all, scores_path
from streamflow.feature_repo import store
from streamflow.feature_repo.compute import Compute
from streamflow.feature_repo.definitions import SNAPSHOT_DATES, build_views
from streamflow.settings import Settings
from streamflow.training.dataset import training_set, training_set_fingerprint
from streamflow.training.demo_data import generate_tables, write_tables
from tests.fixtures.production import ProductionStack, delete_project_keys
from tests.fixtures.training import fixture_settings

TINY_USERS = 20
VIEW = "payments_agg_90d_fv"
"""Users of the Feast-on-Ray checks: Feast's Ray pull-latest runs one task per user (`map_groups`)."""


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    """A local Ray instance for the module; the code under test finds it running and keeps it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """An embedded home with demo data for a few users, applied and materialized by the local engine."""
    settings = fixture_settings(tmp_path_factory.mktemp("ray-home")).model_copy(update={"users": TINY_USERS})
    write_tables(settings, generate_tables(TINY_USERS, settings.seed), TINY_USERS, settings.seed)
    store.apply(settings)
    store.materialize(settings)
    return settings


def _online_rows(settings: Settings) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(settings.feast_dir / "online_store.db") as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: sorted(db.execute(f'SELECT * FROM "{table}"').fetchall()) for table in tables}


def test_ray_materialization_writes_the_local_engines_online_rows(tiny_settings: Settings) -> None:
    # One view: each costs Feast's Ray pipeline tens of seconds on a shared 2-core machine, and all four go
    # through the same path (make bench-scale materializes all of them).
    table = f"{store.EMBEDDED_PROJECT}_{VIEW}"
    local = _online_rows(tiny_settings)[table]
    assert len(local) == TINY_USERS + 1  # the users of January, and one who joined in February
    with sqlite3.connect(tiny_settings.feast_dir / "online_store.db") as db:
        db.execute(f'DELETE FROM "{table}"')

    start, end = store.materialization_window()
    on_ray = tiny_settings.model_copy(update={"compute": Compute.RAY})
    store._materialize_on_ray(store.open_store(on_ray, Compute.RAY), VIEW, start, end)

    assert _online_rows(tiny_settings)[table] == local  # keys, values, event and created times, byte for byte


def test_a_ray_built_training_set_is_the_local_one(tiny_settings: Settings) -> None:
    local = training_set(tiny_settings, SNAPSHOT_DATES[0])

    on_ray = training_set(tiny_settings.model_copy(update={"compute": Compute.RAY}), SNAPSHOT_DATES[0])

    assert len(on_ray) == len(local) > 0
    assert training_set_fingerprint(on_ray) == training_set_fingerprint(local)


def _redis_rows(redis_url: str, project: str) -> dict[bytes, dict[bytes, bytes]]:
    client = redis.Redis.from_url(redis_url)
    keys = client.scan_iter(match=b"*" + project.encode())
    return {key: cast(dict[bytes, bytes], client.hgetall(key)) for key in keys}  # the sync client's answer


@pytest.mark.production
def test_production_on_ray_writes_the_local_engines_redis_rows_and_scores_into_postgresql(
    production_stack: ProductionStack,
) -> None:
    """The production profile on Ray: its PostgreSQL offline store pulls, the Ray workers write Redis, and
    score-all scores on Ray Data into the churn_scores table, as the local engine and run do."""
    settings = production_stack.settings
    on_ray = settings.model_copy(update={"compute": Compute.RAY})
    local = _redis_rows(settings.redis_url, settings.redis_key_prefix)
    assert len(local) > settings.users
    assert delete_project_keys(settings.redis_url, settings.redis_key_prefix) == len(local)

    start, end = store.materialization_window()
    ray_store = store.open_store(on_ray, Compute.RAY)
    for view in build_views(settings):  # every view: PostgreSQL pulls each fast, unlike the file store
        store._materialize_on_ray(ray_store, view.name, start, end)

    assert _redis_rows(settings.redis_url, settings.redis_key_prefix) == local  # byte for byte

    query = "SELECT * FROM churn_scores WHERE as_of = %s ORDER BY user_id"
    local_summary = score_all(settings, SNAPSHOT_DATES[-1])
    with postgres.connect(settings.postgres_dsn) as conn:
        local_scores = conn.execute(query, (SNAPSHOT_DATES[-1],)).fetchall()
    ray_summary = score_all(on_ray, SNAPSHOT_DATES[-1], batch_users=100)
    with postgres.connect(settings.postgres_dsn) as conn:
        assert conn.execute(query, (SNAPSHOT_DATES[-1],)).fetchall() == local_scores
    assert ray_summary.to_json() | {"seconds": 0} == local_summary.to_json() | {"seconds": 0}
    assert ray_summary.users == len(local_scores) > 100


def _scoring_workers() -> list[psutil.Process]:
    """The Ray Data actors holding the model (their process title names the Scorer)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("Scorer" in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_score_all_on_ray_data_writes_the_local_runs_rows_though_a_worker_is_killed_mid_job(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = fresh_embedded_settings
    local = score_all(settings, SNAPSHOT_DATES[-1], output_dir=tmp_path / "local")
    killed: list[int] = []

    def kill_a_worker(done: int, total: int) -> None:
        if not killed and done < total:
            workers = _scoring_workers()
            assert workers, "no Ray Data scoring actor found to kill"
            killed.append(workers[0].pid)
            os.kill(workers[0].pid, signal.SIGKILL)

    on_ray = score_all(
        settings,
        SNAPSHOT_DATES[-1],
        compute=Compute.RAY,
        output_dir=tmp_path / "ray",
        batch_users=50,
        progress=kill_a_worker,
    )

    assert killed, "the job ended before a worker could be killed"
    assert on_ray.to_json() | {"seconds": 0, "output": ""} == local.to_json() | {"seconds": 0, "output": ""}
    pd.testing.assert_frame_equal(
        pd.read_parquet(scores_path(tmp_path / "ray", SNAPSHOT_DATES[-1], "1")),
        pd.read_parquet(scores_path(tmp_path / "local", SNAPSHOT_DATES[-1], "1")),
    )
    assert [p.name for p in (tmp_path / "ray").rglob("*") if p.is_file()] == ["model_version=1.parquet"]
