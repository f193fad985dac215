"""Point-in-time training set, reproducible training and what a trained version carries for serving."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from feast.infra.registry.sql import SqlRegistry
from sqlalchemy.pool import QueuePool

from streamflow.errors import StreamflowError
from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import (
    FEATURE_NAMES,
    FEATURE_SERVICE_NAME,
    LABELS_TABLE,
    SNAPSHOT_DATES,
)
from streamflow.settings import Settings
from streamflow.training import demo_data
from streamflow.training.bootstrap import load_demo_data
from streamflow.training.dataset import FEATURE_DTYPES, LABEL, training_set
from streamflow.training.train import mlflow_client, train, validation_frame
from tests.fixtures.training import FIXTURE_TREES

JAN, FEB = SNAPSHOT_DATES


def _snapshot(settings: Settings, table: str, day: date) -> pd.DataFrame:
    frame = pd.read_parquet(demo_data.table_path(settings, table))
    return frame[frame["as_of"] == demo_data.snapshot_timestamp(day)].set_index("user_id")


def test_training_set_is_the_snapshot_as_it_was(embedded_settings: Settings) -> None:
    frame = training_set(embedded_settings, JAN)

    assert list(frame.columns) == ["user_id", "as_of", *FEATURE_NAMES, LABEL]
    assert {name: str(frame[name].dtype) for name in FEATURE_NAMES} == FEATURE_DTYPES
    assert frame["user_id"].is_monotonic_increasing and frame["user_id"].is_unique
    assert (frame["as_of"] == demo_data.snapshot_timestamp(JAN)).all()
    labels = _snapshot(embedded_settings, LABELS_TABLE, JAN)
    assert sorted(frame["user_id"]) == sorted(labels.index)
    usage = _snapshot(embedded_settings, "usage_agg_30d_snapshots", JAN)
    indexed = frame.set_index("user_id")
    pd.testing.assert_series_equal(
        indexed["watch_hours_30d"], usage.loc[indexed.index, "watch_hours_30d"], check_names=False
    )
    assert (indexed[LABEL] == labels.loc[indexed.index, LABEL]).all()


def test_a_later_snapshot_never_leaks_into_an_earlier_training_set(fresh_embedded_settings: Settings) -> None:
    settings = fresh_embedded_settings
    path = demo_data.table_path(settings, "usage_agg_30d_snapshots")
    usage = pd.read_parquet(path)
    sentinel = 98765.4
    february = usage["as_of"] == demo_data.snapshot_timestamp(FEB)
    usage.loc[february, "watch_hours_30d"] = sentinel
    usage.to_parquet(path, index=False)

    january_set = training_set(settings, JAN)
    assert sentinel not in set(january_set["watch_hours_30d"])
    january = _snapshot(settings, "usage_agg_30d_snapshots", JAN)
    both = january_set.set_index("user_id")
    assert (both["watch_hours_30d"] == january.loc[both.index, "watch_hours_30d"]).all()
    # The edit is really visible to Feast: the February training set has it for every user.
    assert (training_set(settings, FEB)["watch_hours_30d"] == sentinel).all()


def test_two_trainings_at_the_same_date_give_the_same_model(fresh_embedded_settings: Settings) -> None:
    settings = fresh_embedded_settings
    first, second = train(settings, JAN), train(settings, JAN)

    assert (first.version, second.version) == (2, 3)
    assert first.training_set_fingerprint == second.training_set_fingerprint
    timing = "training_time_s"
    assert {k: v for k, v in first.metrics.items() if k != timing} == {
        k: v for k, v in second.metrics.items() if k != timing
    }
    validation = validation_frame(settings, JAN)[list(FEATURE_NAMES)]
    predictions = [
        mlflow.sklearn.load_model(f"models:/{settings.model_name}/{result.version}").predict_proba(validation)
        for result in (first, second)
    ]
    np.testing.assert_array_equal(predictions[0], predictions[1])


def test_a_registered_version_carries_the_serving_contract(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    client = mlflow_client(embedded_settings)
    version = client.get_model_version(embedded_settings.model_name, "1")
    frame = training_set(embedded_settings, JAN)

    assert version.tags["feature_service"] == FEATURE_SERVICE_NAME
    assert version.tags["as_of"] == JAN.isoformat()
    assert len(version.tags["training_set_fingerprint"]) == 64
    run = client.get_run(str(version.run_id))
    expected_params = {
        "as_of": JAN.isoformat(),
        "n_estimators": str(FIXTURE_TREES),
        "min_samples_leaf": str(Settings.model_fields["min_samples_leaf"].default),
        "random_state": "42",
    }
    assert expected_params.items() <= run.data.params.items()
    metrics = {"val_auc", "val_f1", "val_accuracy", "val_precision", "val_recall", "training_time_s"}
    assert metrics <= run.data.metrics.keys()
    assert 0.5 < run.data.metrics["val_auc"] <= 1.0

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/roc_curve.png", "plots/confusion_matrix.png", "plots/feature_importance.png"}
    downloaded = client.download_artifacts(run.info.run_id, "feature_schema.json", str(tmp_path))
    schema = json.loads(Path(downloaded).read_text())
    assert [f["name"] for f in schema["features"]] == list(FEATURE_NAMES)
    assert {f["name"] for f in schema["features"] if f["kind"] == "categorical"} == {"net_service"}

    uri = f"models:/{embedded_settings.model_name}/1"
    signature = mlflow.models.get_model_info(uri).signature
    assert signature is not None and signature.inputs.input_names() == list(FEATURE_NAMES)
    model = mlflow.sklearn.load_model(uri)
    churn = model.predict_proba(frame[list(FEATURE_NAMES)].head(20))[:, 1]
    assert list(model.classes_) == [0, 1] and ((churn >= 0) & (churn <= 1)).all()


def test_no_snapshot_at_as_of(embedded_settings: Settings) -> None:
    with pytest.raises(StreamflowError) as error:
        training_set(embedded_settings, date(2024, 3, 31))
    assert str(error.value) == (
        "There is no snapshot dated 2024-03-31; the snapshots are dated: 2024-01-31, 2024-02-29."
    )


@pytest.mark.production
def test_postgres_training_set_equals_the_embedded_one(
    embedded_settings: Settings, production_settings: Settings
) -> None:
    """The production profile reads the same snapshots from PostgreSQL through Feast's PostgreSQL store."""
    settings = production_settings.model_copy(
        update={"users": embedded_settings.users, "seed": embedded_settings.seed}
    )
    load_demo_data(settings, settings.users, settings.seed)
    store.apply(settings)

    pd.testing.assert_frame_equal(training_set(settings, JAN), training_set(embedded_settings, JAN))
    with pytest.raises(StreamflowError) as error:
        training_set(settings, date(2024, 3, 31))
    assert str(error.value) == (
        "There is no snapshot dated 2024-03-31; the snapshots are dated: 2024-01-31, 2024-02-29."
    )


def test_a_step_closes_the_sql_registry_connections_feast_leaves_open(production_settings: Settings) -> None:
    """Feast's SQL registry pools PostgreSQL connections and has no way to close them: a step (`opened_store`)
    closes them as it ends, where Feast leaves them open until the garbage collector closes them, each with a
    ResourceWarning, in a process that goes on (a test run, `score-all` in a notebook)."""
    with store.opened_store(production_settings) as opened:
        registry = opened.registry  # made on first use, with its tables: one connection, back in the pool
        assert isinstance(registry, SqlRegistry)
        pool = registry.write_engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.checkedin() == 1
    assert pool.checkedin() == 0
