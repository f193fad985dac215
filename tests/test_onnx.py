"""Compiled inference: the ONNX export is the same model (parity on the demo data), the server serves it
when parity holds, and falls back to scikit-learn when the export is absent, unreadable or not faithful."""

from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path

import mlflow
import mlflow.artifacts
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from streamflow.feature_repo.definitions import FEATURE_NAMES
from streamflow.feature_repo.store import open_store
from streamflow.model_contract import (
    ARTIFACT_DIR,
    EXPECTED_COLUMN,
    MODEL_FILE,
    PARITY_FILE,
    PARITY_TAG,
    SAMPLE_FILE,
    ParityReport,
    compare,
)
from streamflow.server.domain import Runtime
from streamflow.server.model_loader import load_model
from streamflow.server.onnx_runtime import MIN_CHUNK_ROWS, OnnxModel, row_chunks
from streamflow.settings import Settings
from streamflow.training.dataset import LABEL
from streamflow.training.onnx_export import export_onnx
from streamflow.training.train import build_pipeline, feature_kinds, validation_frame
from tests.fixtures.training import production_model_version, registry_client


def _run_id(version: ModelVersion) -> str:
    assert version.run_id, f"version {version.version} has no run"
    return version.run_id


def _source(version: ModelVersion) -> str:
    assert version.source, f"version {version.version} has no source"
    return version.source


def _export_dir(settings: Settings, run_id: str, tmp_path: Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=ARTIFACT_DIR,
            dst_path=str(tmp_path),
            tracking_uri=settings.tracking_uri,
        )
    )


def test_onnx_export_reproduces_the_pipeline_on_demo_validation(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    version = production_model_version(embedded_settings)
    export = _export_dir(embedded_settings, _run_id(version), tmp_path)
    pipeline = mlflow.sklearn.load_model(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}",
            dst_path=str(tmp_path / "model"),
            tracking_uri=embedded_settings.tracking_uri,
        )
    )
    onnx = OnnxModel((export / MODEL_FILE).read_bytes())
    validation = validation_frame(embedded_settings, date.fromisoformat(version.tags["as_of"]))[
        list(FEATURE_NAMES)
    ]

    expected, actual = pipeline.predict_proba(validation), onnx.predict_proba(validation)

    assert len(validation) > 50
    assert np.array_equal(pipeline.predict(validation), (actual[:, 1] > 0.5).astype(int))
    assert float(np.abs(expected - actual).max()) <= 1e-5
    # What training logged says the same, and the tag lets anyone see it in the registry.
    report = json.loads((export / PARITY_FILE).read_text())
    assert report["ok"] is True
    assert report["rows"] == len(validation)
    assert report["label_agreement"] == 1.0
    assert report["max_abs_probability_diff"] <= 1e-5
    assert version.tags[PARITY_TAG] == "ok"
    # The sample the server re-checks at load carries the pipeline's own probabilities.
    sample = pd.read_parquet(export / SAMPLE_FILE)
    assert np.array_equal(
        sample[EXPECTED_COLUMN].to_numpy(), pipeline.predict_proba(sample[list(FEATURE_NAMES)])[:, 1]
    )


def test_a_large_batch_split_across_threads_scores_exactly_as_one_run(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    export = _export_dir(embedded_settings, _run_id(production_model_version(embedded_settings)), tmp_path)
    model = (export / MODEL_FILE).read_bytes()
    sample = pd.read_parquet(export / SAMPLE_FILE)[list(FEATURE_NAMES)]
    batch = pd.concat([sample] * (3 * MIN_CHUNK_ROWS // len(sample) + 1), ignore_index=True)
    batch = batch.iloc[: 3 * MIN_CHUNK_ROWS + 7]  # three uneven chunks

    one_run = OnnxModel(model, threads=1).predict_proba(batch)
    three_chunks = OnnxModel(model, threads=3).predict_proba(batch)

    assert len(row_chunks(len(batch), 3)) == 3
    assert one_run.shape == (len(batch), 2)
    assert np.array_equal(one_run, three_chunks)


@pytest.mark.parametrize(
    ("rows", "threads", "chunks"),
    [
        (0, 4, [(0, 0)]),
        (MIN_CHUNK_ROWS * 2 - 1, 4, [(0, MIN_CHUNK_ROWS * 2 - 1)]),  # too few rows for two chunks
        (1000, 1, [(0, 1000)]),
        (1000, 2, [(0, 500), (500, 1000)]),
        (1001, 3, [(0, 333), (333, 667), (667, 1001)]),
    ],
)
def test_row_chunks_split_evenly_and_never_below_the_minimum(
    rows: int, threads: int, chunks: list[tuple[int, int]]
) -> None:
    assert row_chunks(rows, threads) == chunks


def test_parity_report_fails_on_a_different_model(embedded_settings: Settings) -> None:
    validation = validation_frame(
        embedded_settings, date.fromisoformat(production_model_version(embedded_settings).tags["as_of"])
    )
    features = validation[list(FEATURE_NAMES)]
    settings_a = embedded_settings.model_copy(update={"n_estimators": 3, "seed": 1})
    settings_b = embedded_settings.model_copy(update={"n_estimators": 3, "seed": 2})
    categorical, numeric = feature_kinds(features)
    first = build_pipeline(categorical, numeric, settings_a).fit(features, validation[LABEL].astype(int))
    second = build_pipeline(categorical, numeric, settings_b).fit(features, validation[LABEL].astype(int))

    report = compare(first.predict_proba(features)[:, 1], second.predict_proba(features)[:, 1])

    assert not report.ok
    assert report.max_abs_probability_diff > 1e-5
    assert not ParityReport(rows=0, label_agreement=1.0, max_abs_probability_diff=0.0).ok


def test_server_loads_the_onnx_runtime_when_parity_holds(embedded_settings: Settings) -> None:
    settings = embedded_settings.model_copy(update={"runtime": "onnx"})  # the forest kernel would go first
    client = registry_client(settings)
    _, loaded = load_model(settings, client, open_store(settings), production_model_version(settings))

    assert loaded.runtime is Runtime.ONNX
    assert isinstance(loaded.model, OnnxModel)


def _unfaithful_export(settings: Settings, version: ModelVersion, client: MlflowClient, run_id: str) -> None:
    """Log under `run_id` this model's export folder with the model swapped for another forest's export
    (other seed, 3 trees): it loads, but does not reproduce the pipeline's probabilities on the sample."""
    validation = validation_frame(settings, date.fromisoformat(version.tags["as_of"]))
    features = validation[list(FEATURE_NAMES)]
    other = build_pipeline(
        *feature_kinds(features), settings.model_copy(update={"n_estimators": 3, "seed": 7})
    )
    other.fit(features, validation[LABEL].astype(int))
    folder = Path(
        client.download_artifacts(
            _run_id(production_model_version(settings)), ARTIFACT_DIR, str(settings.home)
        )
    )
    (folder / MODEL_FILE).write_bytes(export_onnx(other, features))
    client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_DIR)


def _corrupt_export(settings: Settings, version: ModelVersion, client: MlflowClient, run_id: str) -> None:
    """Log under `run_id` an export whose model file is not ONNX at all."""
    folder = Path(
        client.download_artifacts(
            _run_id(production_model_version(settings)), ARTIFACT_DIR, str(settings.home)
        )
    )
    (folder / MODEL_FILE).write_bytes(b"not an onnx model")
    client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_DIR)


@pytest.mark.parametrize(
    "export", [None, _unfaithful_export, _corrupt_export], ids=["absent", "unfaithful", "corrupt"]
)
def test_server_falls_back_to_sklearn(
    fresh_embedded_settings: Settings, export: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A version of the same model whose run has no usable export is served by the scikit-learn pipeline
    (when ONNX is the first runtime tried: the forest kernel needs only the export's parity sample)."""
    settings = fresh_embedded_settings.model_copy(update={"runtime": "onnx"})
    client = registry_client(settings)
    production = production_model_version(settings)
    run = client.create_run(client.get_run(_run_id(production)).info.experiment_id)
    # The validation metrics training logs: without them the server refuses the version (no provenance).
    for key, value in client.get_run(_run_id(production)).data.metrics.items():
        client.log_metric(run.info.run_id, key, value)
    candidate = client.create_model_version(
        settings.model_name, _source(production), run_id=run.info.run_id, tags=production.tags
    )
    if callable(export):
        export(settings, candidate, client, run.info.run_id)
    candidate = client.get_model_version(settings.model_name, candidate.version)

    with caplog.at_level(logging.WARNING, logger="streamflow.server.model_loader"):
        _, loaded = load_model(settings, client, open_store(settings), candidate)

    assert loaded.runtime is Runtime.SKLEARN
    assert not isinstance(loaded.model, OnnxModel)
    assert f"serving run {run.info.run_id} with scikit-learn" in caplog.text
    if export is _unfaithful_export:
        assert "parity fails" in caplog.text
