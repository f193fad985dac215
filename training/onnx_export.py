"""Export of the fitted pipeline to ONNX, with a parity report, logged beside the registered model.

The export takes one input per feature column, named and typed as the column (Int64 -> int64, Float64 ->
float, Bool -> bool, String -> string), so the server feeds it the frame it gives the scikit-learn pipeline.
The parity report is measured with the runtime the server uses (`server.onnx_runtime.OnnxModel`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import (
    BooleanTensorType,
    DataType,
    FloatTensorType,
    Int64TensorType,
    StringTensorType,
)
from sklearn.pipeline import Pipeline

from streamflow.errors import StreamflowError
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
from streamflow.server.onnx_runtime import OnnxModel

SAMPLE_ROWS = 256
"""Validation rows logged with the export; the server re-checks parity on them when it loads the model."""


def _input_type(column: pd.Series) -> DataType:
    kind = column.dtype.kind
    if kind == "b":
        return BooleanTensorType([None, 1])
    if kind in "iu":
        return Int64TensorType([None, 1])
    if kind == "f":
        return FloatTensorType([None, 1])
    if kind in "OUT" or isinstance(column.dtype, pd.StringDtype):
        return StringTensorType([None, 1])
    raise StreamflowError(f"Column {column.name!r} has dtype {column.dtype}, which ONNX export cannot take.")


def export_onnx(pipeline: Pipeline, frame: pd.DataFrame) -> bytes:
    """The pipeline as an ONNX model whose inputs are the columns of `frame` (typed by their dtypes)."""
    columns = list(pipeline.feature_names_in_)
    initial_types = [(name, _input_type(frame[name])) for name in columns]
    classifier = pipeline.steps[-1][1]
    # zipmap off: probabilities come out as one (n, 2) tensor, like predict_proba, not a list of dicts.
    options = {id(classifier): {"zipmap": False}}
    model = convert_sklearn(pipeline, initial_types=initial_types, options=options)
    exported: bytes = model.SerializeToString()
    return exported


def log_onnx_export(
    client: MlflowClient,
    model_name: str,
    version: str,
    run_id: str,
    pipeline: Pipeline,
    validation: pd.DataFrame,
) -> ParityReport:
    """Export `pipeline`, check parity on `validation`, log both under `onnx/` of the run, tag the version.

    The export is logged even when parity fails (the tag says `failed`; the server keeps scikit-learn), so
    the report and the model that failed it can be examined.
    """
    features = validation[list(pipeline.feature_names_in_)]
    exported = export_onnx(pipeline, features)
    expected = pipeline.predict_proba(features)[:, 1]
    report = compare(expected, OnnxModel(exported).predict_proba(features)[:, 1])
    # The server checks the export against these probabilities of the pipeline, without loading it.
    sample = features.head(SAMPLE_ROWS).assign(**{EXPECTED_COLUMN: expected[:SAMPLE_ROWS]})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / MODEL_FILE).write_bytes(exported)
        (folder / PARITY_FILE).write_text(report.to_json())
        sample.to_parquet(folder / SAMPLE_FILE, index=False)
        client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_DIR)
    client.set_model_version_tag(model_name, version, PARITY_TAG, "ok" if report.ok else "failed")
    return report
