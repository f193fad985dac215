"""Resolves the served model URI in the MLflow registry, loads that version and validates it before it serves.

Runs only on the watcher's thread, never on a request thread: registry calls and artifact downloads are slow
and may time out. A loaded model is an immutable `LoadedModel`: serving swaps the reference, never mutates
it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow.artifacts
import mlflow.sklearn
import numpy as np
import pandas as pd
from feast import FeatureStore
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from server.domain import (
    FeatureScalar,
    FeatureType,
    FeatureValue,
    ModelInfo,
    ModelRef,
    ReloadFailure,
    Runtime,
)
from server.features import VALID_CATEGORIES, FeatureReader, FeatureRow
from server.onnx_runtime import Columns, ProbabilityModel, choose_runtime
from streamflow.errors import StreamflowError
from streamflow.settings import Settings

log = logging.getLogger(__name__)

FEATURE_SERVICE_TAG = "feature_service"
AS_OF_TAG = "as_of"
CHURN_CLASS = 1
"""The pipeline's positive class: `predict_proba(columns)[:, 1]` is the churn probability."""

_NOT_FOUND_CODES = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<stage_or_version>[^/@]+)|@(?P<alias>[^/@]+))$")


class ModelLoadError(StreamflowError):
    """A model version the server refuses to serve; the message says why."""


@dataclass(frozen=True)
class ModelTarget:
    """What `STREAMFLOW_MODEL_URI` points at: a stage, an alias or a fixed version of a registered model."""

    uri: str
    name: str
    stage: str | None = None
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelTarget:
        """`models:/name/Stage`, `models:/name@alias` or `models:/name/3`; anything else is refused."""
        match = _URI.match(uri)
        if match is None:
            raise StreamflowError(
                f"model URI {uri!r} is not of the form models:/<name>/<Stage>, models:/<name>@<alias> "
                "or models:/<name>/<version>"
            )
        name, stage_or_version, alias = match.group("name", "stage_or_version", "alias")
        if alias is not None:
            return cls(uri, name, alias=alias)
        if stage_or_version.isdigit():
            return cls(uri, name, version=stage_or_version)
        return cls(uri, name, stage=stage_or_version)

    def resolve(self, client: MlflowClient) -> ModelVersion | None:
        """The version the registry points at now, or None when no version has that stage or alias."""
        try:
            if self.alias is not None:
                return client.get_model_version_by_alias(self.name, self.alias)
            if self.version is not None:
                return client.get_model_version(self.name, self.version)
        except MlflowException as exc:
            # An unknown version is RESOURCE_DOES_NOT_EXIST; an unset alias is INVALID_PARAMETER_VALUE.
            if exc.error_code in _NOT_FOUND_CODES:
                return None
            raise
        assert self.stage is not None
        # `get_latest_versions` would do this in one call but warns on every poll (stages are deprecated).
        stage = self.stage.lower()
        staged = [
            v
            for v in client.search_model_versions(f"name = '{self.name}'")
            if (v.current_stage or "").lower() == stage
        ]
        if not staged:
            return None
        latest = max(staged, key=lambda v: int(v.version))
        # Search results may lack aliases; a direct read has them.
        return client.get_model_version(self.name, latest.version)


@dataclass(frozen=True)
class LoadedModel:
    """A validated model version and everything needed to serve it; replaced, never changed, on reload."""

    ref: ModelRef
    stage: str
    aliases: tuple[str, ...]
    run_id: str
    model_uri: str
    training_as_of: str
    metrics: dict[str, float]
    loaded_at: datetime
    runtime: Runtime
    model: ProbabilityModel
    reader: FeatureReader

    def info(self, last_reload_failure: ReloadFailure | None) -> ModelInfo:
        """What ModelInfo reports about this model."""
        return ModelInfo(
            model=self.ref,
            stage=self.stage,
            aliases=self.aliases,
            run_id=self.run_id,
            model_uri=self.model_uri,
            training_as_of=self.training_as_of,
            feature_service=self.reader.feature_service,
            features=self.reader.schema,
            metrics=dict(self.metrics),
            loaded_at=self.loaded_at,
            runtime=self.runtime,
            last_reload_failure=last_reload_failure,
        )

    def with_registry_state(self, version: ModelVersion) -> LoadedModel:
        """The same model with the stage and aliases the registry now gives its version."""
        stage, aliases = version.current_stage or "None", tuple(sorted(version.aliases or ()))
        if (stage, aliases) == (self.stage, self.aliases):
            return self
        return dataclasses.replace(self, stage=stage, aliases=aliases)


def load_model(
    settings: Settings, client: MlflowClient, store: FeatureStore, version: ModelVersion
) -> LoadedModel:
    """Load one registry version and validate it; raise `ModelLoadError` when it must not serve."""
    feature_service = version.tags.get(FEATURE_SERVICE_TAG)
    if not feature_service:
        raise ModelLoadError(f"version {version.version} has no {FEATURE_SERVICE_TAG!r} tag")
    reader = FeatureReader(store, feature_service, settings)
    run_id = version.run_id or ""
    runtime, model = choose_runtime(settings, run_id, lambda: _load_pipeline(settings, client, version))
    _smoke_test(model, reader)
    run = client.get_run(run_id)
    return LoadedModel(
        ref=ModelRef(version.name, str(version.version)),
        stage=version.current_stage or "None",
        aliases=tuple(sorted(version.aliases or ())),
        run_id=run_id,
        model_uri=settings.model_uri,
        training_as_of=version.tags.get(AS_OF_TAG, run.data.params.get(AS_OF_TAG, "")),
        metrics=dict(run.data.metrics),
        loaded_at=datetime.now(UTC),
        runtime=runtime,
        model=model,
        reader=reader,
    )


def _load_pipeline(settings: Settings, client: MlflowClient, version: ModelVersion) -> SklearnModel:
    """The version's scikit-learn pipeline, set to score on the calling thread only."""
    # The explicit client resolves the artifact location: a `models:/` URI would be resolved against MLflow's
    # process-wide registry URI, and one process may serve several registries (tests do).
    location = client.get_model_version_download_uri(version.name, str(version.version))
    with tempfile.TemporaryDirectory(prefix="streamflow-model-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=tmp, tracking_uri=settings.tracking_uri
        )
        pipeline = mlflow.sklearn.load_model(path)
    # A thread pool per call costs more than one row's inference (NOTES: 72 ms vs 28 ms); the server already
    # scores calls in parallel.
    n_jobs = {key: 1 for key in pipeline.get_params() if key == "n_jobs" or key.endswith("__n_jobs")}
    pipeline.set_params(**n_jobs)
    classes = [int(c) for c in getattr(pipeline, "classes_", [])]
    if classes != [0, CHURN_CLASS]:
        raise ModelLoadError(f"version {version.version} predicts classes {classes}, not [0, 1] (1 = churn)")
    return SklearnModel(pipeline)


@dataclass(frozen=True)
class SklearnModel:
    """The scikit-learn pipeline behind the runtime seam: its ColumnTransformer selects columns by name, so it
    gets the columns as a DataFrame."""

    pipeline: ProbabilityModel

    def predict_proba(self, columns: Columns) -> np.ndarray:
        probabilities: np.ndarray = self.pipeline.predict_proba(pd.DataFrame(columns))
        return probabilities


def _smoke_test(model: ProbabilityModel, reader: FeatureReader) -> None:
    """Score one typed, in-range row through the same column builder requests use."""
    neutral: dict[FeatureType, FeatureScalar] = {
        FeatureType.INT64: 0,
        FeatureType.DOUBLE: 0.0,
        FeatureType.BOOL: False,
        FeatureType.STRING: "",
    }
    epoch = datetime.fromtimestamp(0, UTC)
    row = FeatureRow(
        "smoke-test",
        tuple(
            FeatureValue(
                f.name,
                min(VALID_CATEGORIES[f.name]) if f.name in VALID_CATEGORIES else neutral[f.type],
                epoch,
            )
            for f in reader.schema
        ),
    )
    try:
        probabilities = np.asarray(model.predict_proba(reader.columns([row])))
    except Exception as exc:
        raise ModelLoadError(f"smoke prediction failed: {type(exc).__name__}: {exc}") from exc
    if probabilities.shape != (1, 2) or not np.all((probabilities >= 0) & (probabilities <= 1)):
        raise ModelLoadError(f"smoke prediction returned {probabilities!r}, not one pair of probabilities")
