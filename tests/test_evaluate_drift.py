"""`streamflow evaluate` and `streamflow drift` on a real log: a server scores the demo's users with its
prediction log on, the month's outcomes are loaded, and the numbers are checked against independent
computations (scikit-learn's `roc_auc_score` on the served responses joined by hand with the labels table;
PSI by hand on a fixed histogram and on the snapshot tables read directly). Every error path has a test."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from prometheus_client import REGISTRY
from scipy.stats import chi2
from sklearn.metrics import roc_auc_score

from streamflow import cli
from streamflow.errors import StreamflowError
from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import (
    JOIN_KEY,
    LABELS_TABLE,
    SNAPSHOT_DATES,
    TIMESTAMP_FIELD,
    VIEW_SPECS,
)
from streamflow.server import metrics
from streamflow.server.app import create_server
from streamflow.server.prediction_sink import DRIFT_FILE, DriftGauge, ParquetSink, in_process_log, log_folder
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Profile, Settings
from streamflow.training.demo_data import table_path
from streamflow.training.drift import drift, feature_drift, psi
from streamflow.training.evaluation import TAG_LAST_EVALUATION, evaluate
from streamflow.training.served import load_outcomes, read_log
from tests.fixtures.metrics import eventually
from tests.fixtures.serving import MODEL_LOAD_TIMEOUT_S, prediction_stub, server_settings
from tests.fixtures.training import relocate_home

TODAY = datetime.now(UTC).date()
REPEATED = 5
"""Users scored twice (a Predict after the batch): counted once, with the last prediction."""


@dataclass(frozen=True)
class Served:
    settings: Settings
    predictions: dict[str, pb.Prediction]
    """The last prediction each user got."""


def _snapshot(settings: Settings, table: str, day: date) -> pd.DataFrame:
    frame = pd.read_parquet(table_path(settings, table))
    return frame[frame[TIMESTAMP_FIELD].dt.date == day]


@pytest.fixture(scope="module")
def served(embedded_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A copy of the bootstrapped home whose server scored every user of the last snapshot (one BatchPredict
    per 300 users, then `REPEATED` Predicts again), with its prediction log on, then stopped."""
    home = tmp_path_factory.mktemp("closing-the-loop") / "home"
    relocate_home(embedded_settings.home, home)
    settings = embedded_settings.model_copy(update={"home": home})
    store.apply(settings)
    # What other tests' servers logged in the session's home today is not this server's.
    shutil.rmtree(log_folder(settings), ignore_errors=True)
    users = list(_snapshot(settings, VIEW_SPECS[0].table, SNAPSHOT_DATES[-1])[JOIN_KEY])
    loaded = threading.Event()
    running = create_server(server_settings(settings), prediction_log=in_process_log(settings))
    predictions: dict[str, pb.Prediction] = {}
    try:
        running.predictor.watcher.subscribe(lambda model: loaded.set())
        assert loaded.wait(MODEL_LOAD_TIMEOUT_S)
        with prediction_stub(running.local_address) as stub:
            for start in range(0, len(users), 300):
                reply = stub.BatchPredict(
                    pb.BatchPredictRequest(user_ids=users[start : start + 300]), timeout=60
                )
                predictions |= {r.user_id: r.prediction for r in reply.results if r.HasField("prediction")}
            for user in users[:REPEATED]:
                predictions[user] = stub.Predict(pb.PredictRequest(user_id=user), timeout=30).prediction
    finally:
        running.stop(grace=None)
    mlflow.set_tracking_uri(settings.tracking_uri)
    return Served(settings, predictions)


def _truth(settings: Settings, users: list[str]) -> np.ndarray:
    """Each user's label of the last snapshot, read from the labels table itself."""
    labels = _snapshot(settings, LABELS_TABLE, SNAPSHOT_DATES[-1]).set_index(JOIN_KEY)["churned"]
    return labels.loc[users].astype(int).to_numpy()


def test_evaluate_before_the_outcomes_are_loaded_says_to_load_them(served: Served) -> None:
    settings = served.settings
    table_path(settings, "churn_outcomes").unlink(missing_ok=True)  # as before `streamflow load-outcomes`
    with pytest.raises(StreamflowError) as error:
        evaluate(settings, TODAY, log_to_mlflow=False)
    assert "streamflow load-outcomes" in str(error.value)


def test_realized_auc_precision_recall_and_calibration_match_independent_computations(served: Served) -> None:
    settings = served.settings
    load_outcomes(settings)

    [result] = evaluate(settings, TODAY)

    users = sorted(served.predictions)
    truth = _truth(settings, users)
    probability = np.array([served.predictions[u].churn_probability for u in users])
    label = np.array([served.predictions[u].label == pb.CHURN_LABEL_CHURN for u in users], dtype=int)
    assert result.model_version == "1"
    assert result.users_scored == result.users_with_outcome == len(users)
    assert result.realized_auc == pytest.approx(roc_auc_score(truth, probability), abs=1e-12)
    true_positives = int(((label == 1) & (truth == 1)).sum())
    assert result.precision == pytest.approx(true_positives / label.sum())
    assert result.recall == pytest.approx(true_positives / truth.sum())
    assert result.brier == pytest.approx(float(np.mean((probability - truth) ** 2)))
    assert sum(b.users for b in result.calibration) == len(users)
    for b in result.calibration:
        inside = (probability >= b.lower) & ((probability < b.upper) | (b.upper == 1.0))
        assert b.users == inside.sum()
        assert b.churn_rate == pytest.approx(truth[inside].mean())

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    assert result.mlflow_run_id is not None
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["realized_auc"] == pytest.approx(result.realized_auc)
    assert run.data.tags["streamflow.evaluated_version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/realized_roc_curve.png", "plots/calibration_curve.png"}
    version = client.get_model_version(settings.model_name, "1")
    assert version.tags[TAG_LAST_EVALUATION] == run.info.run_id
    assert run.data.tags["streamflow.training_run"] == version.run_id


def test_the_commands_print_a_table_json_and_one_error_line(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = served.settings
    monkeypatch.setenv("STREAMFLOW_HOME", str(settings.home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    assert cli.main(["load-outcomes"]) == 0
    assert "loaded the outcomes of" in capsys.readouterr().out

    assert cli.main(["evaluate", "--since", TODAY.isoformat(), "--json", "--no-mlflow"]) == 0
    [reported] = json.loads(capsys.readouterr().out)
    assert reported["users_scored"] == len(served.predictions)

    assert cli.main(["evaluate", "--since", TODAY.isoformat(), "--no-mlflow"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:3] == ["version", "scored", "outcomes"] and row.split()[0] == "1"

    assert cli.main(["drift", "--since", TODAY.isoformat(), "--no-mlflow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 15 and lines[0].startswith("drift of streamflow_churn version 1")
    assert all(line.split()[1] == "PSI" for line in lines[1:])

    assert cli.main(["evaluate", "--since", "2099-01-01", "--no-mlflow"]) == 1
    assert capsys.readouterr().err.startswith("error: No prediction was logged from 2099-01-01")


def test_evaluate_error_paths_say_what_is_missing(served: Served) -> None:
    settings = served.settings
    load_outcomes(settings)
    with pytest.raises(StreamflowError, match=r"No prediction was logged from 2099-01-01 to 2099-01-31"):
        evaluate(settings, date(2099, 1, 1), date(2099, 1, 31), log_to_mlflow=False)
    with pytest.raises(
        StreamflowError, match=r"Model version 7 served no logged prediction.*versions that did: 1"
    ):
        evaluate(settings, TODAY, version="7", log_to_mlflow=False)
    with pytest.raises(StreamflowError, match=r"There is no prediction log in"):
        read_log(settings.model_copy(update={"home": settings.home / "elsewhere"}), TODAY)


def test_outcomes_that_follow_another_snapshot_join_nothing_and_say_so(
    served: Served, tmp_path: Path
) -> None:
    settings = served.settings
    outcomes = load_outcomes(settings)
    path = table_path(settings, "churn_outcomes")
    moved = outcomes.assign(**{TIMESTAMP_FIELD: pd.Timestamp("2024-01-31", tz="UTC")})
    moved.to_parquet(path, index=False)
    try:
        with pytest.raises(
            StreamflowError,
            match=r"scored the snapshot\(s\) 2024-02-29, the outcomes loaded follow 2024-01-31",
        ):
            evaluate(settings, TODAY, log_to_mlflow=False)
    finally:
        load_outcomes(settings)


def test_psi_on_a_fixed_histogram_matches_the_hand_computation() -> None:
    # (0.4 - 0.5) ln(0.4 / 0.5) + (0.4 - 0.3) ln(0.4 / 0.3) + 0 = 0.1 * 0.22314355 + 0.1 * 0.28768207
    assert psi(np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])) == pytest.approx(0.051082562, abs=1e-9)
    # An empty bin counts as 0.0001: (0.0001 - 0.5) ln(0.0001 / 0.5) + (1 - 0.5) ln(1 / 0.5)
    expected = (0.0001 - 0.5) * math.log(0.0001 / 0.5) + 0.5 * math.log(2)
    assert psi(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == pytest.approx(expected, rel=1e-3)


def test_numeric_bins_are_the_training_deciles() -> None:
    training = pd.Series(np.arange(1, 101, dtype=float))  # deciles at 10.9, 20.8, ..., 90.1
    served = pd.Series([5.0] * 50 + [95.0] * 50)  # half in the first decile, half in the last
    result = feature_drift("x", training, served)
    assert result.kind == "numeric"
    assert result.training_share == pytest.approx([0.1] * 10)
    assert result.served_share == pytest.approx([0.5] + [0.0] * 8 + [0.5])
    by_hand = 2 * (0.5 - 0.1) * math.log(0.5 / 0.1) + 8 * (0.0001 - 0.1) * math.log(0.0001 / 0.1)
    assert result.psi == pytest.approx(by_hand, rel=1e-3)
    assert result.verdict == "major shift"


def test_drift_of_the_served_features_matches_the_snapshot_tables(served: Served) -> None:
    settings = served.settings

    report = drift(settings, TODAY)

    assert report.model_version == "1" and report.training_as_of == SNAPSHOT_DATES[0].isoformat()
    assert report.served_rows == len(served.predictions) + REPEATED
    assert report.served_users == len(served.predictions)
    by_feature = {f.feature: f for f in report.features}
    assert len(by_feature) == 14
    # Numeric: the January snapshot table itself (every user has a label) against the February values
    # the server answered each user with.
    january = _snapshot(settings, _table_of("watch_hours_30d"), SNAPSHOT_DATES[0])
    served_values = _served_values(served, "watch_hours_30d")
    reference = january["watch_hours_30d"].to_numpy()
    edges = np.unique(np.quantile(reference, [0.1 * i for i in range(1, 10)]))
    expected = np.array([((reference > lo) & (reference <= hi)).mean() for lo, hi in _intervals(edges)])
    actual = np.array([((served_values > lo) & (served_values <= hi)).mean() for lo, hi in _intervals(edges)])
    assert by_feature["watch_hours_30d"].psi == pytest.approx(psi(expected, actual), rel=1e-9)
    # Categorical: the chi-square statistic of the 2 x k table by hand.
    profile = _snapshot(settings, _table_of("net_service"), SNAPSHOT_DATES[0])
    net = by_feature["net_service"]
    train_counts = profile["net_service"].value_counts()
    served_counts = pd.Series(_served_values(served, "net_service")).value_counts()
    table = pd.DataFrame({"training": train_counts, "served": served_counts}).fillna(0).to_numpy().T
    expected_counts = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = ((table - expected_counts) ** 2 / expected_counts).sum()
    assert net.kind == "categorical"
    assert net.chi2_p_value == pytest.approx(chi2.sf(statistic, table.shape[1] - 1), rel=1e-6)

    # The latest PSI is recorded for the server, whose gauge re-reads it periodically on a thread: the
    # value recorded now, then the one a later run records.
    metrics.FEATURE_PSI.labels("1", "watch_hours_30d").set(-1.0)
    gauge = DriftGauge(settings, interval_s=0.05)
    gauge.start()
    try:
        _wait_for_gauge(by_feature["watch_hours_30d"].psi)
        recorded = log_folder(settings) / DRIFT_FILE
        later = json.loads(recorded.read_text())
        later["psi"]["watch_hours_30d"] = 0.75
        recorded.write_text(json.dumps(later))
        _wait_for_gauge(0.75)
    finally:
        gauge.stop()

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    assert report.mlflow_run_id is not None
    plots = {a.path for a in client.list_artifacts(report.mlflow_run_id, "plots/drift")}
    assert plots == {f"plots/drift/{name}.png" for name in by_feature}
    assert {a.path for a in client.list_artifacts(report.mlflow_run_id, "plots")} >= {
        "plots/drift_summary.png"
    }


def _wait_for_gauge(value: float) -> None:
    labels = {"model_version": "1", "feature": "watch_hours_30d"}
    eventually(
        lambda: REGISTRY.get_sample_value("streamflow_feature_psi", labels) == value,
        f"the gauge reads {value}",
    )


def _table_of(feature: str) -> str:
    return next(spec.table for spec in VIEW_SPECS if feature in dict(spec.features))


def _served_values(served: Served, feature: str) -> np.ndarray:
    """The feature's value in each user's last prediction."""
    values = [f for p in served.predictions.values() for f in p.features if f.name == feature]
    return np.array([getattr(v, str(v.WhichOneof("value"))) for v in values])


def _intervals(edges: np.ndarray) -> list[tuple[float, float]]:
    bounds = [-np.inf, *edges, np.inf]
    return list(itertools.pairwise(bounds))


def test_drift_error_paths_say_what_is_missing(served: Served) -> None:
    settings = served.settings
    with pytest.raises(StreamflowError, match=r"Model version 9 served no logged prediction since"):
        drift(settings, TODAY, version="9", log_to_mlflow=False)
    with pytest.raises(StreamflowError, match=r"No prediction was logged from 2099-01-01"):
        drift(settings, date(2099, 1, 1), log_to_mlflow=False)


def test_a_version_the_registry_no_longer_has_cannot_be_compared_with_its_training_set(
    served: Served, tmp_path: Path
) -> None:
    settings = served.settings.model_copy(update={"home": tmp_path / "home"})
    mlflow_settings = settings.model_copy(update={"mlflow_tracking_uri": served.settings.tracking_uri})
    gone = pb.Prediction()
    gone.CopyFrom(next(iter(served.predictions.values())))
    gone.model.version = "42"
    sink = ParquetSink(log_folder(settings), rotate_s=3600)
    sink.write([(datetime.now(UTC).timestamp(), "r1", gone.SerializeToString(), None)])
    sink.close()
    with pytest.raises(
        StreamflowError, match=r"Model streamflow_churn version 42 or its training run is not in"
    ):
        drift(mlflow_settings, TODAY, log_to_mlflow=False)


def test_an_unreachable_log_database_is_one_sentence() -> None:
    settings = Settings(
        profile=Profile.PRODUCTION, prediction_log_dsn="postgresql://postgres@127.0.0.1:1/log"
    )
    with pytest.raises(StreamflowError, match=r"PostgreSQL at 127.0.0.1:1/log is unreachable"):
        read_log(settings, TODAY)
