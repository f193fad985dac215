"""The forest runtime: the compiled kernel over the explainer's arrays is the same model as the pipeline
(parity on the demo data), scores a row the same alone, in any batch and across threads, serves by default
when its parity holds, and gives way to ONNX when the install has no kernel or the settings ask for ONNX."""

from __future__ import annotations

import importlib.machinery
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
from streamflow.server import native
from streamflow.server.domain import Runtime
from streamflow.server.explanations import forest_arrays
from streamflow.server.forest_runtime import ForestModel
from streamflow.server.loaded_model import SklearnModel
from streamflow.server.model_loader import load_model
from streamflow.server.onnx_runtime import MIN_CHUNK_ROWS, OnnxModel
from streamflow.settings import Settings
from streamflow.training.train import validation_frame


def _client(settings: Settings) -> MlflowClient:
    # MLflow resolves a version's `models:/m-...` source against its process-wide URIs, whatever the client
    # (tests/conftest.py forgets them after each test).
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _production(settings: Settings) -> ModelVersion:
    client = _client(settings)
    version = client.get_model_version_by_alias(settings.model_name, "production")
    return client.get_model_version(settings.model_name, version.version)


def _pipeline_and_validation(settings: Settings, tmp_path: Path) -> tuple[object, pd.DataFrame]:
    version = _production(settings)
    pipeline = mlflow.sklearn.load_model(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}",
            dst_path=str(tmp_path / "model"),
            tracking_uri=settings.tracking_uri,
        )
    )
    validation = validation_frame(settings, date.fromisoformat(version.tags["as_of"]))[list(FEATURE_NAMES)]
    return pipeline, validation


def test_the_kernel_reproduces_the_pipeline_on_demo_validation(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    pipeline, validation = _pipeline_and_validation(embedded_settings, tmp_path)
    forest = ForestModel(forest_arrays(pipeline, list(FEATURE_NAMES)))

    expected, actual = pipeline.predict_proba(validation), forest.predict_proba(validation)  # type: ignore[attr-defined]

    assert len(validation) > 50
    assert actual.shape == expected.shape
    assert np.array_equal(pipeline.predict(validation), (actual[:, 1] > 0.5).astype(int))  # type: ignore[attr-defined]
    # The same leaves: only the order of the sum's rounding differs (each leaf is stored over the trees).
    assert float(np.abs(expected - actual).max()) <= 1e-12


def test_a_row_scores_the_same_alone_in_a_batch_and_across_threads(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    pipeline, validation = _pipeline_and_validation(embedded_settings, tmp_path)
    arrays = forest_arrays(pipeline, list(FEATURE_NAMES))
    rows = pd.concat([validation] * (2 * MIN_CHUNK_ROWS // len(validation) + 1), ignore_index=True)
    columns = {name: rows[name].to_numpy() for name in FEATURE_NAMES}
    assert len(rows) >= 2 * MIN_CHUNK_ROWS  # two threads' chunks

    batch = arrays.transform(columns)
    alone = np.concatenate(
        [arrays.transform({n: c[i : i + 1] for n, c in columns.items()}) for i in range(9)]
    )
    threaded = ForestModel(arrays, threads=2).predict_proba(columns)
    single = ForestModel(arrays, threads=1).predict_proba(columns)
    one_by_one = [
        ForestModel(arrays, threads=1).predict_proba({n: c[i : i + 1] for n, c in columns.items()})
        for i in range(9)
    ]

    # A lone row takes plain Python to its float32 row; a batch takes numpy: the same bits.
    assert batch.dtype == np.float32 and np.array_equal(alone, batch[:9])
    assert np.array_equal(threaded, single)
    assert np.array_equal(np.concatenate(one_by_one), single[:9])


def test_the_server_serves_the_forest_kernel_when_its_parity_holds(embedded_settings: Settings) -> None:
    settings = embedded_settings
    _, loaded = load_model(settings, _client(settings), open_store(settings), _production(settings))

    assert loaded.runtime is Runtime.FOREST
    assert isinstance(loaded.model, ForestModel)
    assert loaded.explainer is not None  # the same arrays explain


@pytest.mark.parametrize(
    ("runtime", "served", "model_type"),
    [("onnx", Runtime.ONNX, OnnxModel), ("sklearn", Runtime.SKLEARN, SklearnModel)],
)
def test_the_settings_choose_the_first_runtime_tried(
    embedded_settings: Settings, runtime: str, served: Runtime, model_type: type
) -> None:
    settings = embedded_settings.model_copy(update={"runtime": runtime})
    _, loaded = load_model(settings, _client(settings), open_store(settings), _production(settings))

    assert loaded.runtime is served
    assert isinstance(loaded.model, model_type)


def test_an_install_without_the_kernel_serves_onnx(
    embedded_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As an install without a C compiler: no compiled kernel to be found beside the module.
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".not-built.so"])
    native.kernel.cache_clear()
    settings = embedded_settings
    try:
        with caplog.at_level(logging.WARNING, logger="streamflow.server.model_loader"):
            _, loaded = load_model(settings, _client(settings), open_store(settings), _production(settings))
    finally:
        native.kernel.cache_clear()

    assert loaded.runtime is Runtime.ONNX
    assert "the forest kernel does not serve (this install has no compiled forest kernel)" in caplog.text
