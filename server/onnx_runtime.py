"""The compiled inference runtime: the training pipeline exported to ONNX, run by onnxruntime.

Training, the one place where the pipeline and its export exist side by side, logs the export next to the
model (`onnx/` in the version's run) with a parity report and a sample of validation rows carrying the
pipeline's own churn probabilities. At load time the control plane (server/model_loader.py) runs the export
on that sample and serves it only when it reproduces those probabilities (labels identical, |Δp| within
1e-5); otherwise, or when the export is absent or unreadable, it serves the scikit-learn pipeline. A worker
serving ONNX thus never imports scikit-learn nor pandas, nor holds the forest twice. Both runtimes expose the
same `predict_proba(columns)`, so the rest of the server never knows which one answers.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

PROBABILITIES_OUTPUT = "probabilities"

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


MIN_CHUNK_ROWS = 128
"""Fewest rows worth a thread of their own: below it, a hand-off costs more than the rows' inference."""


def row_chunks(rows: int, threads: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting `rows` evenly across at most `threads`, none under `MIN_CHUNK_ROWS`."""
    count = max(1, min(threads, rows // MIN_CHUNK_ROWS))
    bounds = [rows * i // count for i in range(count + 1)]  # not numpy: this runs for every one-row Predict
    return list(itertools.pairwise(bounds))


@functools.cache
def chunk_pool(threads: int) -> ThreadPoolExecutor:
    # Created on first use, after any fork of server workers; shared by every model the process loads.
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onnx")


class OnnxModel:
    """An ONNX export of the pipeline with one input per feature column, named as the column.

    The session runs single-threaded: a one-row Predict took 60 µs with a 2-thread session instead of 38 µs.
    A large batch is split into row chunks run at once on up to `threads` threads instead (the session is
    thread-safe and releases the GIL), which halves a 1,000-row batch on 2 cores at no memory cost; a second,
    multi-threaded session would add about 100 MB per worker.
    """

    def __init__(self, model: bytes | Path, threads: int | None = None) -> None:
        """`model`: the ONNX bytes, or a file holding them (read by onnxruntime itself)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        source = str(model) if isinstance(model, Path) else model
        self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self._inputs = [(i.name, _INPUT_DTYPES[i.type]) for i in self._session.get_inputs()]
        self._outputs = [PROBABILITIES_OUTPUT]
        self._threads = threads if threads is not None else len(os.sched_getaffinity(0))

    @property
    def columns(self) -> list[str]:
        """The feature columns the model reads."""
        return [name for name, _ in self._inputs]

    def predict_proba(self, columns: Columns) -> np.ndarray:
        """Class probabilities (n, 2) for the rows of `columns`, like the pipeline's `predict_proba`."""
        feed = {name: np.asarray(columns[name], dtype=dtype).reshape(-1, 1) for name, dtype in self._inputs}
        chunks = row_chunks(len(feed[self._inputs[0][0]]), self._threads)
        if len(chunks) < 2:
            return self._run(feed)
        parts = chunk_pool(self._threads).map(
            lambda chunk: self._run({name: column[chunk[0] : chunk[1]] for name, column in feed.items()}),
            chunks,
        )
        return np.concatenate(list(parts))

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        probabilities: np.ndarray = self._session.run(self._outputs, feed)[0]
        return probabilities
