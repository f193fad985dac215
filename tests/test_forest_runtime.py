"""The forest runtime: the compiled kernel over the explainer's arrays is the same model as the pipeline
(parity on the demo data), scores a row the same alone, in any batch and across threads, serves by default
when its parity holds, and gives way to ONNX when the install has no kernel or the settings ask for ONNX."""

from __future__ import annotations

import importlib.machinery
import logging
from collections.abc import Callable
from datetime import date
from pathlib import Path

import mlflow
import mlflow.artifacts
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest

from streamflow.feature_repo.definitions import FEATURE_NAMES
from streamflow.feature_repo.store import open_store
from streamflow.server import native
from streamflow.server.domain import Runtime
from streamflow.server.explanations import ForestArrays, forest_arrays
from streamflow.server.forest_runtime import ForestModel
from streamflow.server.loaded_model import LoadedModel, SklearnModel
from streamflow.server.model_loader import choose_runtime, load_model
from streamflow.server.onnx_runtime import MIN_CHUNK_ROWS, OnnxModel
from streamflow.settings import Settings
from streamflow.training.dataset import LABEL
from streamflow.training.train import build_pipeline, feature_kinds, validation_frame
from tests.fixtures.training import production_model_version, registry_client


def _pipeline_and_validation(settings: Settings, tmp_path: Path) -> tuple[object, pd.DataFrame]:
    version = production_model_version(settings)
    pipeline = mlflow.sklearn.load_model(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}",
            dst_path=str(tmp_path / "model"),
            tracking_uri=settings.tracking_uri,
        )
    )
    validation = validation_frame(settings, date.fromisoformat(version.tags["as_of"]))[list(FEATURE_NAMES)]
    return pipeline, validation


def _load(settings: Settings) -> LoadedModel:
    """The production version loaded as the server loads it, with the runtime these settings choose."""
    _, loaded = load_model(
        settings, registry_client(settings), open_store(settings), production_model_version(settings)
    )
    return loaded


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
    loaded = _load(settings)

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
    loaded = _load(settings)

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
            loaded = _load(settings)
    finally:
        native.kernel.cache_clear()

    assert loaded.runtime is Runtime.ONNX
    assert "the forest kernel does not serve (this install has no compiled forest kernel)" in caplog.text


def _other_forest(settings: Settings, tmp_path: Path) -> ForestArrays:
    """Another forest over the same features (other seed, 3 trees): it walks, but is not this model."""
    _, validation = _pipeline_and_validation(settings, tmp_path)
    version = production_model_version(settings)
    labels = validation_frame(settings, date.fromisoformat(version.tags["as_of"]))[LABEL].astype(int)
    other = build_pipeline(
        *feature_kinds(validation), settings.model_copy(update={"n_estimators": 3, "seed": 7})
    ).fit(validation, labels)
    return forest_arrays(other, list(FEATURE_NAMES))


@pytest.mark.parametrize(
    ("forest", "reason"),
    [
        (None, "the model is not a forest the kernel walks"),
        (_other_forest, "forest parity fails on"),
    ],
    ids=["not-a-forest", "unfaithful"],
)
def test_a_forest_the_kernel_cannot_serve_gives_way_to_onnx(
    embedded_settings: Settings,
    tmp_path: Path,
    forest: Callable[[Settings, Path], ForestArrays] | None,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = embedded_settings
    run_id = production_model_version(settings).run_id
    assert run_id is not None

    with caplog.at_level(logging.WARNING, logger="streamflow.server.model_loader"):
        runtime, model = choose_runtime(
            settings, run_id, lambda: b"", None if forest is None else forest(settings, tmp_path)
        )

    assert runtime is Runtime.ONNX and model  # the run's faithful export
    assert f"run {run_id}: the forest kernel does not serve ({reason}" in caplog.text
