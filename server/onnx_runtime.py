"""The compiled inference runtime: the training pipeline exported to ONNX, run by onnxruntime.

Training, the one place where the pipeline and its export exist side by side, logs the export next to the
model (`onnx/` in the version's run) with a parity report and a sample of validation rows carrying the
pipeline's own churn probabilities. At load time the server runs the export on that sample and serves it only
when it reproduces those probabilities (labels identical, |Δp| within 1e-5); otherwise, or when the export is
absent or unreadable, it loads the scikit-learn pipeline. A worker serving ONNX thus never imports
scikit-learn nor holds the forest twice (about 370 MB resident instead of 490 MB on the demo model). Both
runtimes expose the same `predict_proba(columns)`, so the rest of the server never knows which one answers.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import mlflow.artifacts
import numpy as np
import onnxruntime as ort
import pandas as pd

from server.domain import Runtime
from streamflow.settings import Settings

log = logging.getLogger(__name__)

ARTIFACT_DIR = "onnx"
"""Folder of the version's run holding the export."""
MODEL_FILE = "model.onnx"
PARITY_FILE = "parity.json"
SAMPLE_FILE = "parity_sample.parquet"
PARITY_TAG = "onnx_parity"
"""Model-version tag set by training: `ok` or `failed`."""
PROBABILITY_TOLERANCE = 1e-5
"""Largest accepted |probability difference| between the ONNX export and the pipeline."""
PROBABILITIES_OUTPUT = "probabilities"
EXPECTED_COLUMN = "expected_churn_probability"
"""Column of the logged sample holding the pipeline's churn probability of each row."""

# ONNX input element type -> the numpy dtype a frame column is converted to. Floats go in as float32 because
# scikit-learn's trees compare float32 features too: feeding float64 flips splits that lie between the two.
_INPUT_DTYPES: dict[str, Any] = {
    "tensor(int64)": np.int64,
    "tensor(float)": np.float32,
    "tensor(bool)": np.bool_,
    "tensor(string)": object,
}


Columns = Mapping[str, Any]
"""Feature columns by name, one value per row (numpy arrays on the request path; a DataFrame fits too)."""


class ProbabilityModel(Protocol):
    """What the server scores with: feature columns in, class probabilities (n, 2) out."""

    def predict_proba(self, columns: Columns) -> np.ndarray: ...


class OnnxModel:
    """An ONNX export of the pipeline with one input per feature column, named as the column."""

    def __init__(self, model: bytes) -> None:
        options = ort.SessionOptions()
        # One thread per call: the server already runs calls (and processes) in parallel, and a thread pool
        # per call costs more than it saves for the row counts served here.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._inputs = [(i.name, _INPUT_DTYPES[i.type]) for i in self._session.get_inputs()]
        self._outputs = [PROBABILITIES_OUTPUT]

    @property
    def columns(self) -> list[str]:
        """The feature columns the model reads."""
        return [name for name, _ in self._inputs]

    def predict_proba(self, columns: Columns) -> np.ndarray:
        """Class probabilities (n, 2) for the rows of `columns`, like the pipeline's `predict_proba`."""
        feed = {name: np.asarray(columns[name], dtype=dtype).reshape(-1, 1) for name, dtype in self._inputs}
        probabilities: np.ndarray = self._session.run(self._outputs, feed)[0]
        return probabilities


@dataclass(frozen=True)
class ParityReport:
    """How closely the ONNX export reproduces the pipeline on a set of rows."""

    rows: int
    label_agreement: float
    max_abs_probability_diff: float
    tolerance: float = PROBABILITY_TOLERANCE

    @property
    def ok(self) -> bool:
        """Identical labels and probabilities within the tolerance."""
        close = self.max_abs_probability_diff <= self.tolerance
        return self.rows > 0 and self.label_agreement == 1.0 and close

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


def compare(expected: np.ndarray, actual: np.ndarray) -> ParityReport:
    """Parity of two churn-probability vectors: share of equal labels (churn when p > 0.5, as served) and
    max |Δp|."""
    if len(expected) == 0:
        return ParityReport(rows=0, label_agreement=0.0, max_abs_probability_diff=float("inf"))
    return ParityReport(
        rows=len(expected),
        label_agreement=float(np.mean((expected > 0.5) == (actual > 0.5))),
        max_abs_probability_diff=float(np.abs(expected - actual).max()),
    )


def load_verified_onnx(export_dir: Path) -> OnnxModel:
    """The ONNX model in `export_dir` if it reproduces the pipeline's probabilities logged with its sample.

    Raises ValueError when it does not, OSError when files are missing, and whatever onnxruntime raises for
    an unreadable model.
    """
    model = OnnxModel((export_dir / MODEL_FILE).read_bytes())
    sample = pd.read_parquet(export_dir / SAMPLE_FILE)
    report = compare(sample[EXPECTED_COLUMN].to_numpy(), model.predict_proba(sample)[:, 1])
    if not report.ok:
        raise ValueError(
            f"ONNX parity fails on {report.rows} sample rows: label agreement {report.label_agreement:.4f}, "
            f"max |Δp| {report.max_abs_probability_diff:.2e} (tolerance {report.tolerance:.0e})"
        )
    return model


def choose_runtime(
    settings: Settings, run_id: str, load_pipeline: Callable[[], ProbabilityModel]
) -> tuple[Runtime, ProbabilityModel]:
    """The ONNX export logged in `run_id` when it loads and its parity holds, else `load_pipeline()`.

    Every reason to fall back is logged; none is an error, since the pipeline is the model of record.
    """
    with tempfile.TemporaryDirectory(prefix="streamflow-onnx-") as tmp:
        try:
            export_dir = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=ARTIFACT_DIR, dst_path=tmp, tracking_uri=settings.tracking_uri
            )
            model = load_verified_onnx(Path(export_dir))
        except Exception as exc:  # absent, unreadable or not faithful: all mean "serve the pipeline"
            log.warning("serving run %s with scikit-learn: no usable ONNX export (%s)", run_id, exc)
            return Runtime.SKLEARN, load_pipeline()
    log.info("serving run %s with the ONNX export (parity holds on its sample)", run_id)
    return Runtime.ONNX, model
