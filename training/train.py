"""Train the churn model at one snapshot date, log everything to MLflow and register it.

The model is ``Pipeline(ColumnTransformer(OneHotEncoder | passthrough), RandomForestClassifier)``: it takes a
frame whose columns are FEATURE_NAMES with FEATURE_DTYPES and returns churn probability as
``predict_proba[:, 1]``. Training is reproducible: the training set is sorted, the split and the forest are
seeded by ``settings.seed``, so the same data and settings give the same model.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import date
from importlib.metadata import version
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: training runs on machines without a display

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import infer_signature
from sklearn.base import ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import FEATURE_NAMES, FEATURE_SERVICE_NAME, VIEW_SPECS
from streamflow.model_contract import METRIC_VAL_AUC, TAG_AS_OF, TAG_FEATURE_SERVICE, TAG_FINGERPRINT
from streamflow.settings import Profile, Settings
from streamflow.training.dataset import FEATURE_DTYPES, LABEL, training_set, training_set_fingerprint

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.25
# A user is predicted to churn when the churn probability exceeds this, as `predict` and the server decide.
CHURN_THRESHOLD = 0.5
# skops refuses to load types it does not trust; a forest's trees are the one type beyond its defaults.
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]
# What loading and running the logged pipeline needs, pinned to the versions installed here.
MODEL_REQUIREMENTS = ("scikit-learn", "skops", "numpy", "pandas", "scipy")


@dataclass(frozen=True)
class TrainingResult:
    """What one training produced: the registered version, its run and validation metrics."""

    model_name: str
    version: int
    run_id: str
    as_of: date
    training_set_fingerprint: str
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (the `train --json` output)."""
        return {**asdict(self), "as_of": self.as_of.isoformat()}


def mlflow_client(settings: Settings) -> MlflowClient:
    """A client of the settings' tracking server and registry; also points MLflow's fluent API at them."""
    if settings.profile is Profile.EMBEDDED and settings.mlflow_tracking_uri is None:
        (settings.home / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    experiment = client.get_experiment_by_name(settings.model_name)
    if experiment is not None:
        return str(experiment.experiment_id)
    # A tracking server chooses where artifacts go. A database URI has no such server: MLflow would default to
    # ./mlruns of whatever folder the command runs in, so artifacts go to the home folder instead.
    served = settings.tracking_uri.startswith(("http://", "https://"))
    location = None if served else settings.artifact_root.as_uri()
    return str(client.create_experiment(settings.model_name, artifact_location=location))


def split(frame: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, validation rows) of a training set: stratified on the label, seeded."""
    if frame[LABEL].nunique() < 2:
        raise StreamflowError("Every label of the training set is the same, so churn cannot be learned.")
    if frame[LABEL].value_counts().min() < 2:
        raise StreamflowError("The training set has fewer than two users of one class; it cannot be split.")
    train_rows, validation_rows = train_test_split(
        frame, test_size=VALIDATION_FRACTION, stratify=frame[LABEL], random_state=seed
    )
    return train_rows, validation_rows


def validation_frame(settings: Settings, as_of: date, seed: int | None = None) -> pd.DataFrame:
    """The validation rows (user_id, as_of, features, label) of the training set at `as_of`.

    The rows a training with `seed` (default: settings.seed) held out, so a promotion gate, the ONNX parity
    check or a test can score several models on one split.
    """
    return split(training_set(settings, as_of), settings.seed if seed is None else seed)[1]


def feature_kinds(features: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(categorical, numeric) column names: text columns are categorical, numbers and booleans numeric."""
    categorical = [
        c
        for c in features.columns
        if features[c].dtype == object or pd.api.types.is_string_dtype(features[c])
    ]
    return categorical, [c for c in features.columns if c not in categorical]


def build_pipeline(categorical: list[str], numeric: list[str], settings: Settings) -> Pipeline:
    """One-hot categoricals, numbers as they are, then a seeded RandomForest using every core."""
    prepare = ColumnTransformer(
        [
            ("categorical", OneHotEncoder(handle_unknown="ignore", sparse_output=False), categorical),
            ("numeric", "passthrough", numeric),
        ]
    )
    forest = RandomForestClassifier(
        n_estimators=settings.n_estimators,
        min_samples_leaf=settings.min_samples_leaf,
        random_state=settings.seed,
        n_jobs=-1,
    )
    return Pipeline([("prepare", prepare), ("model", forest)])


def score(model: ClassifierMixin, validation: pd.DataFrame) -> dict[str, float]:
    """Validation metrics of a fitted model."""
    truth = validation[LABEL].astype(int).to_numpy()
    probability = model.predict_proba(validation[list(FEATURE_NAMES)])[:, 1]
    predicted = (probability > CHURN_THRESHOLD).astype(int)
    return {
        METRIC_VAL_AUC: float(roc_auc_score(truth, probability)),
        "val_f1": float(f1_score(truth, predicted, zero_division=0)),
        "val_accuracy": float(accuracy_score(truth, predicted)),
        "val_precision": float(precision_score(truth, predicted, zero_division=0)),
        "val_recall": float(recall_score(truth, predicted, zero_division=0)),
    }


def _importances(pipeline: Pipeline, categorical: list[str], numeric: list[str]) -> pd.Series:
    """Forest importances per input feature (a categorical's one-hot columns summed), largest first."""
    encoder: OneHotEncoder = pipeline.named_steps["prepare"].named_transformers_["categorical"]
    owners = [name for name, values in zip(categorical, encoder.categories_, strict=True) for _ in values]
    owners += numeric
    forest: RandomForestClassifier = pipeline.named_steps["model"]
    return pd.Series(forest.feature_importances_, index=owners).groupby(level=0).sum().sort_values()


def _log_plots(pipeline: Pipeline, validation: pd.DataFrame, importances: pd.Series) -> None:
    truth = validation[LABEL].astype(int).to_numpy()
    probability = pipeline.predict_proba(validation[list(FEATURE_NAMES)])[:, 1]

    figure, axes = plt.subplots(figsize=(5, 5))
    RocCurveDisplay.from_predictions(truth, probability, name="RandomForest", ax=axes, plot_chance_level=True)
    axes.set_title("ROC curve on the validation split")
    mlflow.log_figure(figure, "plots/roc_curve.png")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5, 4))
    ConfusionMatrixDisplay.from_predictions(
        truth,
        (probability > CHURN_THRESHOLD).astype(int),
        display_labels=["stays", "churns"],
        ax=axes,
        colorbar=False,
    )
    axes.set_title(f"Confusion matrix at threshold {CHURN_THRESHOLD}")
    mlflow.log_figure(figure, "plots/confusion_matrix.png")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 5))
    importances.plot.barh(ax=axes)
    axes.set_xlabel("mean decrease in impurity")
    axes.set_title("Feature importances")
    figure.tight_layout()
    mlflow.log_figure(figure, "plots/feature_importance.png")
    plt.close(figure)


def _feature_schema(categorical: list[str]) -> dict[str, Any]:
    feast_types = {name: str(dtype) for spec in VIEW_SPECS for name, dtype in spec.features}
    return {
        "feature_service": FEATURE_SERVICE_NAME,
        "label": LABEL,
        "features": [
            {
                "name": name,
                "feast_type": feast_types[name],
                "dtype": FEATURE_DTYPES[name],
                "kind": "categorical" if name in categorical else "numeric",
            }
            for name in FEATURE_NAMES
        ],
    }


def train(settings: Settings, as_of: date) -> TrainingResult:
    """Train at `as_of` on Feast's point-in-time training set, log the run and register a new version."""
    frame = training_set(settings, as_of)
    fingerprint = training_set_fingerprint(frame)
    train_rows, validation = split(frame, settings.seed)
    features = train_rows[list(FEATURE_NAMES)]
    categorical, numeric = feature_kinds(features)
    pipeline = build_pipeline(categorical, numeric, settings)

    client = mlflow_client(settings)
    experiment_id = _experiment_id(client, settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"churn-{as_of}") as run:
        mlflow.set_tags({TAG_AS_OF: as_of.isoformat(), TAG_FINGERPRINT: fingerprint})
        mlflow.log_params(
            {
                "as_of": as_of.isoformat(),
                "n_estimators": settings.n_estimators,
                "min_samples_leaf": settings.min_samples_leaf,
                "random_state": settings.seed,
                "feature_service": FEATURE_SERVICE_NAME,
                "validation_fraction": VALIDATION_FRACTION,
                "training_rows": len(train_rows),
                "validation_rows": len(validation),
                "categorical_features": ",".join(categorical),
                "numeric_features": ",".join(numeric),
            }
        )
        log.info("fitting %d trees on %d rows (%s)", settings.n_estimators, len(train_rows), as_of)
        started = time.monotonic()
        pipeline.fit(features, train_rows[LABEL].astype(int))
        # Trees are fitted in parallel, each from its own seed, so the same data gives the same trees. A
        # parallel predict_proba adds the trees' fractional leaf values up in whichever order its threads
        # finish, so the same model could answer 1 ulp apart from one call to the next: it predicts on one
        # thread (the server splits large batches across threads itself).
        pipeline.set_params(model__n_jobs=1)
        metrics = {"training_time_s": round(time.monotonic() - started, 3), **score(pipeline, validation)}
        mlflow.log_metrics(metrics)
        log.info("validation: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

        log.info("logging plots, schema and the model to MLflow")
        importances = _importances(pipeline, categorical, numeric)
        mlflow.log_dict(_feature_schema(categorical), "feature_schema.json")
        mlflow.log_dict(importances.sort_values(ascending=False).to_dict(), "feature_importance.json")
        _log_plots(pipeline, validation, importances)

        example = validation[list(FEATURE_NAMES)].head(5)
        with warnings.catch_warnings():
            # MLflow's hint that integer columns cannot hold missing values: the server refuses missing
            # features before the model sees them, so integers are the right schema.
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            signature = infer_signature(example, pipeline.predict(example))
        model_info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=signature,
            input_example=example,
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
            # Stated, not inferred: inference re-imports the model in a subprocess and costs seconds per run.
            pip_requirements=[f"{package}=={version(package)}" for package in MODEL_REQUIREMENTS],
        )
        registered = mlflow.register_model(
            model_info.model_uri,
            settings.model_name,
            tags={
                TAG_FEATURE_SERVICE: FEATURE_SERVICE_NAME,
                TAG_AS_OF: as_of.isoformat(),
                TAG_FINGERPRINT: fingerprint,
            },
        )
        _log_compiled(client, settings, str(registered.version), run.info.run_id, pipeline, validation)

    log.info("registered %s version %s (run %s)", settings.model_name, registered.version, run.info.run_id)
    return TrainingResult(
        model_name=settings.model_name,
        version=int(registered.version),
        run_id=run.info.run_id,
        as_of=as_of,
        training_set_fingerprint=fingerprint,
        metrics=metrics,
    )


def _log_compiled(
    client: MlflowClient,
    settings: Settings,
    version: str,
    run_id: str,
    pipeline: Pipeline,
    validation: pd.DataFrame,
) -> None:
    """The ONNX export and its parity report on the validation rows, logged with the version."""
    # Imported here: the export pulls in skl2onnx and onnxruntime, which the rest of training does not need.
    from streamflow.training.onnx_export import log_onnx_export

    log.info(
        "exporting version %s to ONNX and checking parity on %d validation rows", version, len(validation)
    )
    report = log_onnx_export(client, settings.model_name, version, run_id, pipeline, validation)
    log.info("ONNX export: parity %s", "ok" if report.ok else "FAILED, the server will use scikit-learn")
