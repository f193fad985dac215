"""Resolves the served model URI in the MLflow registry, loads that version and validates it before it serves.

Runs only on the watcher's thread, never on a request thread: registry calls and artifact downloads are slow
and may time out. A loaded model is an immutable `LoadedModel`: serving swaps the reference, never mutates
it.

Only what the training pipeline produced serves (`streamflow.model_contract`): a version is refused unless
its logged signature takes exactly the features of its FeatureService, with their types, and it carries the
pipeline's provenance (the `as_of` and training-set fingerprint tags, validation metrics on its run). Then
the model must predict classes 0 and 1 and score one typed row. A refusal has two texts: the log gets the
detail, ModelInfo callers a short fixed sentence (`ModelLoadError.reason`) that never holds exception text.
"""

from __future__ import annotations

import logging
import pickle
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.sklearn
import numpy as np
import pandas as pd
from feast import FeatureStore
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import DataType, Schema

from streamflow.errors import StreamflowError
from streamflow.model_contract import (
    ARTIFACT_DIR,
    CHURN_CLASS,
    EXPECTED_COLUMN,
    MODEL_FILE,
    REQUIRED_METRICS,
    SAMPLE_FILE,
    TAG_AS_OF,
    TAG_FEATURE_SERVICE,
    TAG_FINGERPRINT,
    compare,
)
from streamflow.server.domain import FeatureScalar, FeatureType, FeatureValue, ModelRef, Runtime
from streamflow.server.explanations import ExplainerUnsupported, ForestArrays, forest_arrays
from streamflow.server.feature_layout import FeatureServiceError, feature_layout
from streamflow.server.features import FeatureRow
from streamflow.server.forest_runtime import ForestModel
from streamflow.server.forest_runtime import kernel_available as forest_kernel_available
from streamflow.server.loaded_model import LoadedModel
from streamflow.server.onnx_runtime import OnnxModel, ProbabilityModel
from streamflow.server.scoring_artifact import FeatureLayout, ScoringArtifact
from streamflow.settings import Settings

log = logging.getLogger(__name__)

FAILED_TO_LOAD = "it failed to load; see the server log"
"""What callers are told about a refusal nobody foresaw (an exception from MLflow, Feast, the model)."""

# The MLflow signature type a training frame column of each served type gets (`infer_signature`).
_SIGNATURE_TYPES: dict[FeatureType, str] = {
    FeatureType.INT64: DataType.long.name,
    FeatureType.DOUBLE: DataType.double.name,
    FeatureType.BOOL: DataType.boolean.name,
    FeatureType.STRING: DataType.string.name,
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
NOT_FOUND_CODES = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<stage_or_version>[^/@]+)|@(?P<alias>[^/@]+))$")


class ModelLoadError(StreamflowError):
    """A model version the server refuses to serve. The message is the detail for the log; `reason` is the
    short fixed sentence ModelInfo hands callers (no exception text, no paths, no registry values beyond a
    FeatureService name the server itself resolved)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


STAGE_READS = 3
"""Times a stage is resolved again when the registry changes between its search and its direct read."""


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
            if exc.error_code in NOT_FOUND_CODES:
                return None
            raise
        assert self.stage is not None
        stage = self.stage.lower()
        for _ in range(STAGE_READS):
            # `get_latest_versions` would do this in one call but warns on every poll (stages are deprecated).
            staged = [
                v
                for v in client.search_model_versions(f"name = '{self.name}'")
                if (v.current_stage or "").lower() == stage
            ]
            if not staged:
                return None
            latest = max(staged, key=lambda v: int(v.version))
            # Search results may lack aliases; a direct read has them. A promotion between the two reads
            # gives the version found its new stage (Archived): the search is read again, so the version
            # returned is the one the stage holds, not the one it held a moment ago.
            read = client.get_model_version(self.name, latest.version)
            if (read.current_stage or "").lower() == stage:
                return read
        # The registry kept changing: the search's own record, in the stage (it may lack the aliases).
        return latest


def build_artifact(
    settings: Settings, client: MlflowClient, store: FeatureStore, version: ModelVersion
) -> ScoringArtifact:
    """Load one registry version, validate it and write down everything scoring needs; raise
    `ModelLoadError` when it must not serve.

    The cheap checks (tags, FeatureService, signature, run) come before the model itself is loaded; the
    smoke test builds the model exactly as a worker will, from the artifact alone."""
    feature_service = version.tags.get(TAG_FEATURE_SERVICE)
    if not feature_service:
        raise ModelLoadError(
            f"version {version.version} has no {TAG_FEATURE_SERVICE!r} tag",
            f"it has no {TAG_FEATURE_SERVICE} tag",
        )
    try:
        layout = feature_layout(store, feature_service)
    except FeatureServiceError as exc:
        raise ModelLoadError(
            str(exc), f"its {TAG_FEATURE_SERVICE} tag names no FeatureService this server can serve"
        ) from exc
    _check_inputs(version, layout, _signature_inputs(settings, client, version))
    run_id = version.run_id or ""
    metrics = dict(client.get_run(run_id).data.metrics) if run_id else {}
    _check_provenance(version, run_id, metrics)
    # The pipeline is loaded whichever runtime serves: the forest runtime and explanations read its forest.
    pipeline = _load_pipeline(settings, client, version)
    forest = _forest(version, pipeline, layout)
    runtime, model = choose_runtime(settings, run_id, lambda: pickle.dumps(pipeline), forest)
    artifact = ScoringArtifact(
        ref=ModelRef(version.name, str(version.version)),
        stage=version.current_stage or "None",
        aliases=tuple(sorted(version.aliases or ())),
        run_id=run_id,
        model_uri=settings.model_uri,
        training_as_of=version.tags[TAG_AS_OF],
        metrics=metrics,
        layout=layout,
        runtime=runtime,
        model=model,
        explainer=forest,
    )
    return artifact


def _forest(version: ModelVersion, pipeline: object, layout: FeatureLayout) -> ForestArrays | None:
    """The forest flattened for explanations and the forest runtime, or None (logged) when the model is not
    one the explainer takes: it still serves (with ONNX or the pipeline), and calls that ask to `explain` get
    EXPLANATIONS_UNAVAILABLE."""
    try:
        return forest_arrays(pipeline, [feature.name for feature in layout.schema])
    except ExplainerUnsupported as exc:
        log.warning("version %s serves without explanations: %s", version.version, exc)
        return None


_LOADING = threading.Lock()
"""Held for a whole load. The production and shadow watchers load on threads of their own, and Python 3.11's
AST builder keeps its recursion depth per interpreter, not per thread (CPython gh-106905): numpy parses every
array header with `ast.literal_eval`, so two loads interleaved there fail with a spurious SystemError. A load
is CPU-bound under the GIL, so taking turns costs the second one little."""


def load_model(
    settings: Settings, client: MlflowClient, store: FeatureStore, version: ModelVersion
) -> tuple[ScoringArtifact, LoadedModel]:
    """`build_artifact`, then the model built from it as a worker builds it, smoke-tested.

    One load at a time per process: see `_LOADING`."""
    with _LOADING:
        artifact = build_artifact(settings, client, store, version)
        try:
            loaded = LoadedModel.from_artifact(artifact, settings)
        except Exception as exc:
            raise ModelLoadError(
                f"the scoring artifact does not load: {type(exc).__name__}: {exc}", _SMOKE_FAILED
            ) from exc
        _smoke_test(loaded, artifact)
    return artifact, loaded


def _signature_inputs(
    settings: Settings, client: MlflowClient, version: ModelVersion
) -> dict[str, str] | None:
    """The logged model's input columns and their MLflow types, or None when it logged no column signature.

    Reads only the version's `MLmodel` file, not the model."""
    location = client.get_model_version_download_uri(version.name, str(version.version))
    with tempfile.TemporaryDirectory(prefix="streamflow-mlmodel-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/MLmodel", dst_path=tmp, tracking_uri=settings.tracking_uri
        )
        signature = Model.load(path).signature
    inputs = None if signature is None else signature.inputs
    if not isinstance(inputs, Schema) or inputs.is_tensor_spec() or not inputs.has_input_names():
        return None
    return {
        str(column.name): column.type.name if isinstance(column.type, DataType) else str(column.type)
        for column in inputs.inputs
    }


def _check_inputs(version: ModelVersion, reader: FeatureLayout, inputs: dict[str, str] | None) -> None:
    """Refuse a model whose inputs are not exactly the FeatureService's features with their types."""
    reason = f"its inputs do not match FeatureService {reader.feature_service}"
    if inputs is None:
        raise ModelLoadError(
            f"version {version.version} logged no column signature to check against FeatureService "
            f"{reader.feature_service}",
            reason,
        )
    expected = {f.name: _SIGNATURE_TYPES[f.type] for f in reader.schema}
    problems = [f"{name} ({kind}) missing" for name, kind in expected.items() if name not in inputs]
    problems += [
        f"{name} ({kind}) not in the FeatureService" for name, kind in inputs.items() if name not in expected
    ]
    problems += [
        f"{name} is {inputs[name]}, the FeatureService says {kind}"
        for name, kind in expected.items()
        if name in inputs and inputs[name] != kind
    ]
    if problems:
        raise ModelLoadError(
            f"version {version.version}'s signature does not match FeatureService {reader.feature_service}: "
            + "; ".join(problems),
            reason,
        )


def _check_provenance(version: ModelVersion, run_id: str, metrics: dict[str, float]) -> None:
    """Refuse a model the training pipeline did not produce: it tags the snapshot date and the training set's
    fingerprint and logs validation metrics on the version's run."""
    lacking = []
    try:
        date.fromisoformat(version.tags.get(TAG_AS_OF, ""))
    except ValueError:
        lacking.append(f"no {TAG_AS_OF} date tag")
    if not _SHA256.fullmatch(version.tags.get(TAG_FINGERPRINT, "")):
        lacking.append(f"no {TAG_FINGERPRINT} tag")
    if not run_id:
        lacking.append("no training run")
    lacking += [f"no {metric} metric" for metric in REQUIRED_METRICS if run_id and metric not in metrics]
    if lacking:
        refusal = f"it lacks the training pipeline's provenance: {', '.join(lacking)}"
        raise ModelLoadError(f"version {version.version}: {refusal}", refusal)


def _load_pipeline(settings: Settings, client: MlflowClient, version: ModelVersion) -> Any:
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
        raise ModelLoadError(
            f"version {version.version} predicts classes {classes}, not [0, 1] (1 = churn)",
            "it does not predict the classes 0 and 1 (1 = churn)",
        )
    return pipeline


_SMOKE_FAILED = "it failed a test prediction; see the server log"


def _smoke_test(loaded: LoadedModel, artifact: ScoringArtifact) -> None:
    """Score one typed, valid row through the same column builder requests use."""
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
            FeatureValue(f.name, min(rule.categories) if rule.categories else neutral[f.type], epoch)
            for f, rule in zip(artifact.layout.schema, artifact.layout.rules, strict=True)
        ),
    )
    try:
        probabilities = np.asarray(loaded.model.predict_proba(loaded.reader.columns([row])))
    except Exception as exc:
        raise ModelLoadError(f"smoke prediction failed: {type(exc).__name__}: {exc}", _SMOKE_FAILED) from exc
    if probabilities.shape != (1, 2) or not np.all((probabilities >= 0) & (probabilities <= 1)):
        raise ModelLoadError(
            f"smoke prediction returned {probabilities!r}, not one pair of probabilities", _SMOKE_FAILED
        )


def verify_parity(runtime: Runtime, model: ProbabilityModel, sample: pd.DataFrame) -> None:
    """Raise ValueError unless `model` reproduces the pipeline's probabilities logged with the parity sample
    (labels identical, |Δp| within the contract's tolerance)."""
    report = compare(sample[EXPECTED_COLUMN].to_numpy(), model.predict_proba(sample)[:, 1])
    if not report.ok:
        raise ValueError(
            f"{runtime} parity fails on {report.rows} sample rows: label agreement "
            f"{report.label_agreement:.4f}, max |Δp| {report.max_abs_probability_diff:.2e} "
            f"(tolerance {report.tolerance:.0e})"
        )


def load_verified_onnx(export_dir: Path, sample: pd.DataFrame) -> bytes:
    """The ONNX model in `export_dir` if it reproduces the pipeline's probabilities on `sample`.

    Raises ValueError when it does not, OSError when the file is missing, and whatever onnxruntime raises for
    an unreadable model.
    """
    model_bytes = (export_dir / MODEL_FILE).read_bytes()
    verify_parity(Runtime.ONNX, OnnxModel(model_bytes), sample)
    return model_bytes


def choose_runtime(
    settings: Settings, run_id: str, load_pipeline: Callable[[], bytes], forest: ForestArrays | None
) -> tuple[Runtime, bytes]:
    """The first runtime, from `settings.runtime` down (the forest kernel over `forest`, the ONNX export
    logged in `run_id`, the pickled pipeline `load_pipeline()` gives), that can serve: the first two only
    when they reproduce the pipeline's probabilities on the parity sample logged beside the export. Every
    reason to fall back is logged; none is an error, since the pipeline is the model of record."""
    if settings.runtime == "sklearn":
        log.info("serving run %s with scikit-learn (STREAMFLOW_RUNTIME=sklearn)", run_id)
        return Runtime.SKLEARN, load_pipeline()
    with tempfile.TemporaryDirectory(prefix="streamflow-onnx-") as tmp:
        try:
            export_dir = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id,
                    artifact_path=ARTIFACT_DIR,
                    dst_path=tmp,
                    tracking_uri=settings.tracking_uri,
                )
            )
            sample = pd.read_parquet(export_dir / SAMPLE_FILE)
        except Exception as exc:  # absent or unreadable: nothing to prove a compiled runtime faithful with
            log.warning("serving run %s with scikit-learn: no parity sample (%s)", run_id, exc)
            return Runtime.SKLEARN, load_pipeline()
        if settings.runtime == "auto":
            try:
                if forest is None:
                    raise ValueError("the model is not a forest the kernel walks")
                if not forest_kernel_available():
                    raise ValueError("this install has no compiled forest kernel")
                verify_parity(Runtime.FOREST, ForestModel(forest), sample)
            except Exception as exc:  # not a forest, no kernel, not faithful: all mean "try ONNX"
                log.warning("run %s: the forest kernel does not serve (%s); trying ONNX", run_id, exc)
            else:
                log.info("serving run %s with the forest kernel (parity holds on its sample)", run_id)
                return Runtime.FOREST, b""
        try:
            model = load_verified_onnx(export_dir, sample)
        except Exception as exc:  # absent, unreadable or not faithful: all mean "serve the pipeline"
            log.warning("serving run %s with scikit-learn: no usable ONNX export (%s)", run_id, exc)
            return Runtime.SKLEARN, load_pipeline()
    log.info("serving run %s with the ONNX export (parity holds on its sample)", run_id)
    return Runtime.ONNX, model
