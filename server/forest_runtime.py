"""The forest runtime: the pipeline's forest walked by StreamFlow's compiled kernel (`_forest.c`), over the
arrays the control plane flattened for explanations (server/explanations.py `ForestArrays`).

A lone Predict's inference is a walk of a few thousand nodes; onnxruntime spent most of its time around them
(the feed's 14 tensors, the graph's one-hot and zip operators, its output copies) and its per-node tables
are larger, so a worker whose caches the call layer had cooled waited on memory longer. The kernel reads the
24-byte nodes the explainer maps read-only, so every worker shares their pages. The control plane serves this
runtime only when it reproduces the pipeline's probabilities logged with the run's parity sample
(server/model_loader.py), as it does for ONNX.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from streamflow.server import native
from streamflow.server.explanations import ForestArrays
from streamflow.server.onnx_runtime import Columns, chunk_pool, row_chunks

LIBRARY, FUNCTION = "_forest", "streamflow_forest_proba"


def kernel_available() -> bool:
    """Whether this install has the compiled forest kernel."""
    return native.available(LIBRARY, FUNCTION)


class ForestModel:
    """A forest's `predict_proba` over its flattened arrays; a large batch is split into row chunks scored at
    once on up to `threads` threads (the kernel releases the GIL), as the ONNX runtime splits its own."""

    def __init__(self, forest: ForestArrays, threads: int | None = None) -> None:
        self._forest = forest
        self._roots = np.ascontiguousarray(forest.arrays["roots"])
        self._nodes = forest.arrays["nodes"]  # mapped read-only, shared by every worker
        # Made once: a ctypes view of an array costs microseconds, a tenth of a lone row's walk.
        self._fixed = (
            ctypes.c_int(len(self._roots)),
            native.address(self._roots),
            native.address(self._nodes),
        )
        self._threads = threads if threads is not None else len(os.sched_getaffinity(0))
        self._kernel = native.kernel(LIBRARY, FUNCTION)

    def predict_proba(self, columns: Columns) -> np.ndarray:
        """Class probabilities (n, 2) for the rows of `columns`, like the pipeline's `predict_proba`."""
        x = self._forest.transform(columns)
        churn = np.empty(len(x))
        chunks = row_chunks(len(x), self._threads)
        if len(chunks) < 2:
            self._run(x, churn)
        else:
            pool = chunk_pool(self._threads)
            list(pool.map(lambda c: self._run(x[c[0] : c[1]], churn[c[0] : c[1]]), chunks))
        return np.stack([1.0 - churn, churn], axis=1)

    def _run(self, x: np.ndarray, churn: np.ndarray) -> None:
        self._kernel(
            *self._fixed,
            ctypes.c_int(len(x)),
            ctypes.c_int(x.shape[1]),
            native.address(x),
            native.address(churn),
        )
