"""`streamflow drift`: how far the served features moved from those the serving version was trained on.

The served side is the prediction log (each feature value as the server read it), each user once as last
served in the range (a user scored a thousand times would otherwise outweigh the rest); the reference is the
version's training set, rebuilt from its MLflow run (its `as_of` tag, through the same point-in-time join,
checked against the run's training-set fingerprint).

Per feature:
- the population stability index, PSI = sum over bins of (served share - training share) * ln(served share /
  training share): numeric features over the training set's deciles (edges at its 10%...90% quantiles, open at
  both ends), categorical ones (text and booleans) over their categories; a share of 0 counts as 0.0001;
- for categorical ones, a chi-square test of homogeneity of the two count tables (scipy's
  `chi2_contingency`);
- a verdict: PSI below 0.1 stable, below 0.25 a moderate shift, else a major shift (the usual thresholds).

A chart per feature (training vs served shares per bin) and one summary picture (PSI per feature) are logged
to MLflow in a drift run tagged with the version. The latest PSI per feature is recorded for the server,
which exports it as the gauge `streamflow_feature_psi` (re-read every minute): `drift.json` beside the log's
Parquet files (embedded) or the `feature_drift` table in the log's database (production).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import FEATURE_NAMES, JOIN_KEY
from streamflow.settings import Settings
from streamflow.training.evaluation import monitoring_run
from streamflow.training.served import read_log

log = logging.getLogger(__name__)

EPSILON = 1e-4
"""The share an empty bin counts as, so PSI stays finite."""
QUANTILES = tuple(round(0.1 * i, 1) for i in range(1, 10))
MODERATE, MAJOR = 0.1, 0.25
"""PSI thresholds of a moderate and a major shift."""
CHI2_ALPHA = 0.01


@dataclass
class FeatureDrift:
    feature: str
    kind: str
    """`numeric` or `categorical`."""
    psi: float
    verdict: str
    bins: list[str]
    training_share: list[float]
    served_share: list[float]
    chi2_p_value: float | None = None


@dataclass
class DriftReport:
    model_name: str
    model_version: str
    training_as_of: str
    training_rows: int
    served_rows: int
    """Predictions logged for the version in the range."""
    served_users: int
    """Distinct users among them: the served distribution counts each user once, as last served, so a user
    scored again and again does not outweigh the others."""
    features: list[FeatureDrift] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def psi(training_share: np.ndarray, served_share: np.ndarray) -> float:
    """The population stability index of two share vectors over the same bins."""
    expected = np.clip(np.asarray(training_share, dtype=float), EPSILON, None)
    actual = np.clip(np.asarray(served_share, dtype=float), EPSILON, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def verdict(value: float) -> str:
    if value < MODERATE:
        return "stable"
    if value < MAJOR:
        return "moderate shift"
    return "major shift"


def numeric_bins(training: np.ndarray) -> np.ndarray:
    """Inner bin edges: the training values' deciles, deduplicated (a feature of few values has fewer)."""
    return np.unique(np.quantile(training.astype(float), QUANTILES))


def numeric_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Shares of `values` in the bins (-inf, e1], (e1, e2], ..., (ek, inf)."""
    index = np.searchsorted(edges, values.astype(float), side="left")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def feature_drift(name: str, training: pd.Series, served: pd.Series) -> FeatureDrift:
    """The drift of one feature between its training and served values."""
    categorical = training.dtype == object or pd.api.types.is_bool_dtype(training)
    if categorical:
        from scipy.stats import chi2_contingency

        categories = sorted({str(v) for v in training} | {str(v) for v in served})
        train_counts = training.astype(str).value_counts().reindex(categories, fill_value=0).to_numpy()
        served_counts = served.astype(str).value_counts().reindex(categories, fill_value=0).to_numpy()
        value = psi(train_counts / train_counts.sum(), served_counts / served_counts.sum())
        table = np.vstack([train_counts, served_counts])
        table = table[:, table.sum(axis=0) > 0]
        p_value = float(chi2_contingency(table)[1]) if table.shape[1] > 1 else 1.0
        return FeatureDrift(
            name,
            "categorical",
            value,
            verdict(value),
            categories,
            (train_counts / train_counts.sum()).tolist(),
            (served_counts / served_counts.sum()).tolist(),
            p_value,
        )
    edges = numeric_bins(training.to_numpy())
    train_share = numeric_shares(training.to_numpy(), edges)
    served_share = numeric_shares(served.to_numpy(), edges)
    labels = [f"<= {edges[0]:g}"] if len(edges) else ["all"]
    labels += [f"({a:g}, {b:g}]" for a, b in itertools.pairwise(edges)]
    if len(edges):
        labels.append(f"> {edges[-1]:g}")
    value = psi(train_share, served_share)
    return FeatureDrift(
        name, "numeric", value, verdict(value), labels, train_share.tolist(), served_share.tolist()
    )


def served_features(predictions: pd.DataFrame) -> pd.DataFrame:
    """One column per feature, one row per logged prediction."""
    return pd.DataFrame(list(predictions["features"]))


def drift(
    settings: Settings, since: date, version: str | None = None, log_to_mlflow: bool = True
) -> DriftReport:
    """The drift report of `version` (default: the version of the last logged prediction)."""
    from streamflow.training.dataset import training_set, training_set_fingerprint
    from streamflow.training.train import mlflow_client

    predictions = read_log(settings, since)
    served_versions = sorted(set(predictions["model_version"]))
    if version is None:
        version = str(predictions["model_version"].iloc[-1])
    elif version not in served_versions:
        raise StreamflowError(
            f"Model version {version} served no logged prediction since {since}; the versions that did: "
            f"{', '.join(served_versions)}."
        )
    rows = predictions[predictions["model_version"] == version]
    name = str(rows["model_name"].iloc[0])
    client = mlflow_client(settings)
    from mlflow.exceptions import MlflowException

    from streamflow.model_contract import TAG_AS_OF, TAG_FINGERPRINT

    try:
        registered = client.get_model_version(name, version)
        run = client.get_run(str(registered.run_id))
    except MlflowException as exc:
        raise StreamflowError(
            f"Model {name} version {version} or its training run is not in the registry at "
            f"{settings.tracking_uri}, so its training set cannot be rebuilt."
        ) from exc
    as_of_text = run.data.tags.get(TAG_AS_OF) or run.data.params.get("as_of")
    if not as_of_text:
        raise StreamflowError(f"The training run {run.info.run_id} of version {version} has no as_of tag.")
    as_of = date.fromisoformat(as_of_text)
    training = training_set(settings, as_of)
    recorded = run.data.tags.get(TAG_FINGERPRINT)
    if recorded and recorded != training_set_fingerprint(training):
        log.warning(
            "the training set rebuilt at %s differs from the one version %s was trained on (the offline data "
            "changed since); drift is measured against the rebuilt one",
            as_of,
            version,
        )
    last = rows.drop_duplicates(JOIN_KEY, keep="last")
    served = served_features(last)
    features = [f for f in FEATURE_NAMES if f in served.columns]
    report = DriftReport(name, version, as_of.isoformat(), len(training), len(rows), len(last))
    for feature in features:
        report.features.append(feature_drift(feature, training[feature], served[feature].dropna()))
    if log_to_mlflow:
        report.mlflow_run_id = _log_drift(settings, report, str(registered.run_id), since)
    export(settings, report)
    return report


def export(settings: Settings, report: DriftReport) -> None:
    """Record the latest PSI per feature where the server reads it (and set this process's gauge)."""
    import json
    from datetime import UTC, datetime

    from streamflow.server import metrics
    from streamflow.server.prediction_sink import (
        DRIFT_FILE,
        DRIFT_TABLE,
        create_drift_table,
        log_dsn,
        log_folder,
    )
    from streamflow.settings import Profile

    measured = datetime.now(UTC)
    if settings.profile is Profile.PRODUCTION:
        from streamflow import postgres

        with postgres.connect(log_dsn(settings)) as connection, connection.transaction():
            create_drift_table(connection)
            for item in report.features:
                connection.execute(
                    f"INSERT INTO {DRIFT_TABLE} (model_version, feature, psi, measured_at) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (model_version, feature) "
                    "DO UPDATE SET psi = EXCLUDED.psi, measured_at = EXCLUDED.measured_at",
                    (report.model_version, item.feature, item.psi, measured),
                )
    else:
        folder = log_folder(settings)
        folder.mkdir(parents=True, exist_ok=True)
        latest = {
            "model_version": report.model_version,
            "measured_at": measured.isoformat(),
            "psi": {item.feature: item.psi for item in report.features},
        }
        temporary = folder / f".{DRIFT_FILE}.tmp"
        temporary.write_text(json.dumps(latest, indent=2))
        temporary.replace(folder / DRIFT_FILE)  # a reader sees the old file or the new one, whole
    for item in report.features:
        metrics.FEATURE_PSI.labels(report.model_version, item.feature).set(item.psi)


def _log_drift(settings: Settings, report: DriftReport, source_run: str, since: date) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    with monitoring_run(
        settings, "drift", "drift", report.model_name, report.model_version, source_run
    ) as run:
        mlflow.log_params({"since": since.isoformat(), "training_as_of": report.training_as_of})
        mlflow.log_metrics({f"psi.{f.feature}": f.psi for f in report.features})
        mlflow.log_metrics(
            {f"chi2_p.{f.feature}": f.chi2_p_value for f in report.features if f.chi2_p_value is not None}
        )
        mlflow.log_dict(report.to_json(), "drift.json")
        for item in report.features:
            figure, axes = plt.subplots(figsize=(7, 4))
            positions = np.arange(len(item.bins))
            axes.bar(
                positions - 0.2, item.training_share, width=0.4, label=f"training ({report.training_as_of})"
            )
            axes.bar(positions + 0.2, item.served_share, width=0.4, label="served")
            axes.set_xticks(positions, item.bins, rotation=45, ha="right", fontsize=7)
            axes.set_ylabel("share")
            extra = f", chi2 p={item.chi2_p_value:.3g}" if item.chi2_p_value is not None else ""
            axes.set_title(f"{item.feature}: PSI {item.psi:.3f} ({item.verdict}{extra})")
            axes.legend()
            figure.tight_layout()
            mlflow.log_figure(figure, f"plots/drift/{item.feature}.png")
            plt.close(figure)
        figure, axes = plt.subplots(figsize=(7, 5))
        ordered = sorted(report.features, key=lambda f: f.psi)
        colours = [
            "tab:green" if f.psi < MODERATE else "tab:orange" if f.psi < MAJOR else "tab:red" for f in ordered
        ]
        axes.barh([f.feature for f in ordered], [f.psi for f in ordered], color=colours)
        axes.axvline(MODERATE, color="tab:orange", linestyle="--", label=f"moderate ({MODERATE})")
        axes.axvline(MAJOR, color="tab:red", linestyle="--", label=f"major ({MAJOR})")
        axes.set_xlabel("population stability index")
        axes.set_title(f"Drift of version {report.model_version}'s served features")
        axes.legend(loc="lower right")
        figure.tight_layout()
        mlflow.log_figure(figure, "plots/drift_summary.png")
        plt.close(figure)
    return str(run.info.run_id)


def lines(report: DriftReport) -> list[str]:
    """One verdict line per feature."""
    out = [
        f"drift of {report.model_name} version {report.model_version}: {report.served_users} users served "
        f"({report.served_rows} predictions) vs its training set of {report.training_as_of} "
        f"({report.training_rows} rows)"
    ]
    width = max((len(f.feature) for f in report.features), default=0)
    for item in report.features:
        test = ""
        if item.chi2_p_value is not None:
            differs = "differs" if item.chi2_p_value < CHI2_ALPHA else "no evidence of a difference"
            test = f"; chi-square p={item.chi2_p_value:.3g} ({differs})"
        out.append(f"{item.feature:<{width}}  PSI {item.psi:7.4f}  {item.verdict}{test}")
    return out
