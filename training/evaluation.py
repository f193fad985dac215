"""`streamflow evaluate`: the realized performance of each served model version, once the outcomes arrived.

Each logged prediction is joined with the outcome of the snapshot it scored (the date of its newest feature)
for its user. A user scored several times by one version counts once, with the last prediction served. Per
version: users scored, users with an outcome, realized AUC (scikit-learn's `roc_auc_score`), precision and
recall of the label served, and calibration (the Brier score, the expected calibration error over ten
equal-width probability bins, and the bins themselves). The ROC curve and the calibration curve are logged to
MLflow in an evaluation run tagged with the model version and its training run, and the version is tagged
with that run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import JOIN_KEY, TIMESTAMP_FIELD
from streamflow.settings import Settings
from streamflow.training.served import read_log, read_outcomes

log = logging.getLogger(__name__)

CALIBRATION_BINS = 10
TAG_EVALUATED_VERSION = "streamflow.evaluated_version"
"""Tag of an evaluation run: the model version it evaluates."""
TAG_EVALUATED_MODEL = "streamflow.evaluated_model"
TAG_SOURCE_RUN = "streamflow.training_run"
"""Tag of an evaluation or drift run: the training run of the version."""
TAG_LAST_EVALUATION = "last_evaluation_run"
"""Tag of a model version: its latest evaluation run."""


@dataclass(frozen=True)
class CalibrationBin:
    lower: float
    upper: float
    users: int
    mean_probability: float
    churn_rate: float


@dataclass
class VersionEvaluation:
    """The realized performance of one model version."""

    model_name: str
    model_version: str
    users_scored: int
    users_with_outcome: int
    churn_rate: float
    realized_auc: float | None
    """None when the outcomes hold one class only (AUC is undefined)."""
    precision: float
    recall: float
    brier: float
    expected_calibration_error: float
    calibration: list[CalibrationBin] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def calibration_bins(truth: np.ndarray, probability: np.ndarray) -> list[CalibrationBin]:
    """Equal-width bins of the predicted probability with their mean prediction and observed churn rate."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    # The last bin is closed on the right, so a probability of exactly 1 falls in it.
    index = np.clip(np.digitize(probability, edges[1:-1], right=False), 0, CALIBRATION_BINS - 1)
    bins = []
    for b in range(CALIBRATION_BINS):
        inside = index == b
        if inside.any():
            bins.append(
                CalibrationBin(
                    float(edges[b]),
                    float(edges[b + 1]),
                    int(inside.sum()),
                    float(probability[inside].mean()),
                    float(truth[inside].mean()),
                )
            )
    return bins


def evaluate_version(name: str, version: str, users_scored: int, joined: pd.DataFrame) -> VersionEvaluation:
    """The metrics of one version from its joined rows (`churn_probability`, `churn`, `outcome`)."""
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    truth = joined["outcome"].astype(int).to_numpy()
    probability = joined["churn_probability"].astype(float).to_numpy()
    label = joined["churn"].astype(int).to_numpy()
    auc = float(roc_auc_score(truth, probability)) if len(set(truth)) == 2 else None
    bins = calibration_bins(truth, probability)
    ece = sum(b.users * abs(b.mean_probability - b.churn_rate) for b in bins) / len(truth)
    return VersionEvaluation(
        model_name=name,
        model_version=version,
        users_scored=users_scored,
        users_with_outcome=len(joined),
        churn_rate=float(truth.mean()),
        realized_auc=auc,
        precision=float(precision_score(truth, label, zero_division=0)),
        recall=float(recall_score(truth, label, zero_division=0)),
        brier=float(np.mean((probability - truth) ** 2)),
        expected_calibration_error=float(ece),
        calibration=bins,
    )


def join_outcomes(predictions: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """The last prediction per (version, user) joined with the outcome of the snapshot it scored."""
    last = predictions.drop_duplicates(["model_name", "model_version", JOIN_KEY], keep="last")
    keyed = outcomes.assign(snapshot=outcomes[TIMESTAMP_FIELD].dt.date).rename(columns={"churned": "outcome"})
    return last.merge(keyed[[JOIN_KEY, "snapshot", "outcome"]], on=[JOIN_KEY, "snapshot"], how="inner")


def evaluate(
    settings: Settings,
    since: date,
    until: date | None = None,
    version: str | None = None,
    log_to_mlflow: bool = True,
) -> list[VersionEvaluation]:
    """Every served version's realized performance (or `version`'s alone), logged to MLflow."""
    predictions = read_log(settings, since, until)
    served_versions = sorted(set(predictions["model_version"]), key=_version_key)
    if version is not None:
        if version not in served_versions:
            raise StreamflowError(
                f"Model version {version} served no logged prediction in that range; the versions that did: "
                f"{', '.join(served_versions)}."
            )
        predictions = predictions[predictions["model_version"] == version]
    outcomes = read_outcomes(settings)
    joined = join_outcomes(predictions, outcomes)
    if joined.empty:
        scored = sorted({str(s) for s in predictions["snapshot"]})
        known = sorted({str(d.date()) for d in outcomes[TIMESTAMP_FIELD]})
        raise StreamflowError(
            f"None of the {predictions[JOIN_KEY].nunique()} users scored has an outcome yet: the predictions "
            f"scored the snapshot(s) {', '.join(scored)}, the outcomes loaded follow {', '.join(known)}."
        )
    results = []
    for (name, served), rows in joined.groupby(["model_name", "model_version"], sort=False):
        scored = predictions[(predictions["model_name"] == name) & (predictions["model_version"] == served)]
        results.append(evaluate_version(str(name), str(served), scored[JOIN_KEY].nunique(), rows))
    results.sort(key=lambda r: _version_key(r.model_version))
    if log_to_mlflow:
        for result, (_, rows) in zip(results, _rows_by_version(joined, results), strict=True):
            result.mlflow_run_id = _log_evaluation(settings, result, rows, since, until)
    return results


def _rows_by_version(
    joined: pd.DataFrame, results: list[VersionEvaluation]
) -> list[tuple[str, pd.DataFrame]]:
    return [(r.model_version, joined[joined["model_version"] == r.model_version]) for r in results]


def _version_key(version: str) -> tuple[int, str]:
    """Numeric versions in numeric order, anything else after them."""
    return (int(version), version) if version.isdigit() else (1 << 62, version)


def _log_evaluation(
    settings: Settings, result: VersionEvaluation, rows: pd.DataFrame, since: date, until: date | None
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from sklearn.metrics import RocCurveDisplay

    from streamflow.training.train import mlflow_client

    client = mlflow_client(settings)
    source_run = _version_run(client, result.model_name, result.model_version)
    truth = rows["outcome"].astype(int).to_numpy()
    probability = rows["churn_probability"].astype(float).to_numpy()
    with monitoring_run(
        settings, "evaluation", "evaluate", result.model_name, result.model_version, source_run or ""
    ) as run:
        mlflow.log_params({"since": since.isoformat(), "until": until.isoformat() if until else "now"})
        metrics = {
            "users_scored": result.users_scored,
            "users_with_outcome": result.users_with_outcome,
            "churn_rate": result.churn_rate,
            "precision": result.precision,
            "recall": result.recall,
            "brier": result.brier,
            "expected_calibration_error": result.expected_calibration_error,
        }
        if result.realized_auc is not None:
            metrics["realized_auc"] = result.realized_auc
        mlflow.log_metrics(metrics)
        mlflow.log_dict(result.to_json(), "evaluation.json")
        if result.realized_auc is not None:
            figure, axes = plt.subplots(figsize=(5, 5))
            RocCurveDisplay.from_predictions(
                truth, probability, name=f"version {result.model_version}", ax=axes, plot_chance_level=True
            )
            axes.set_title("Realized ROC curve (served predictions vs outcomes)")
            mlflow.log_figure(figure, "plots/realized_roc_curve.png")
            plt.close(figure)
        figure, axes = plt.subplots(figsize=(5, 5))
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        axes.plot(
            [b.mean_probability for b in result.calibration],
            [b.churn_rate for b in result.calibration],
            marker="o",
            label=f"version {result.model_version}",
        )
        axes.set_xlabel("mean predicted churn probability (bin)")
        axes.set_ylabel("observed churn rate")
        axes.set_title(f"Calibration (ECE {result.expected_calibration_error:.3f})")
        axes.legend(loc="upper left")
        mlflow.log_figure(figure, "plots/calibration_curve.png")
        plt.close(figure)
    if source_run is not None:
        client.set_model_version_tag(
            result.model_name, result.model_version, TAG_LAST_EVALUATION, run.info.run_id
        )
    return str(run.info.run_id)


@contextlib.contextmanager
def monitoring_run(
    settings: Settings, kind: str, prefix: str, model_name: str, model_version: str, source_run: str
) -> Iterator[Any]:
    """An MLflow run named `prefix-<model>-v<version>` in the project's experiment, tagged with the version
    it is about, that version's training run and its `kind` (evaluation, drift)."""
    import mlflow

    from streamflow.training.train import _experiment_id, mlflow_client

    with mlflow.start_run(
        experiment_id=_experiment_id(mlflow_client(settings), settings),
        run_name=f"{prefix}-{model_name}-v{model_version}",
    ) as run:
        mlflow.set_tags(
            {
                TAG_EVALUATED_MODEL: model_name,
                TAG_EVALUATED_VERSION: model_version,
                TAG_SOURCE_RUN: source_run,
                "streamflow.kind": kind,
            }
        )
        yield run


def _version_run(client: Any, name: str, version: str) -> str | None:
    """The training run of a registered version, or None when the registry no longer has it."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version(name, version).run_id)
    except MlflowException:
        log.warning(
            "model %s version %s is not in the registry; the evaluation run is not linked", name, version
        )
        return None


def table(results: list[VersionEvaluation]) -> str:
    """The results as a text table, one line per version."""
    header = (
        f"{'version':>7}  {'scored':>7}  {'outcomes':>8}  {'churn':>6}  {'AUC':>6}  {'precision':>9}  "
        f"{'recall':>6}  {'Brier':>6}  {'ECE':>6}"
    )
    lines = [header]
    for r in results:
        auc = f"{r.realized_auc:.3f}" if r.realized_auc is not None else "n/a"
        lines.append(
            f"{r.model_version:>7}  {r.users_scored:>7}  {r.users_with_outcome:>8}  {r.churn_rate:>6.3f}  "
            f"{auc:>6}  {r.precision:>9.3f}  {r.recall:>6.3f}  {r.brier:>6.3f}  "
            f"{r.expected_calibration_error:>6.3f}"
        )
    return "\n".join(lines)
