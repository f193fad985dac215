"""Per-prediction explanations: exact path-dependent TreeSHAP of the forest, over the model's raw features.

The control plane, which holds the scikit-learn pipeline, flattens its forest into plain arrays
(`forest_arrays`): per node its children, the transformed column it tests, the raw feature that column comes
from (the one-hot columns of a categorical all map to it), the threshold, the cover fraction of each child,
and per leaf its class-1 probability over the number of trees. The arrays go into the scoring artifact
beside the model (`ForestArrays.save`); a worker maps them read-only (`ForestArrays.load`), so they cost no
memory until the first explanation touches them, and the pages are shared by every worker.

`Explainer` turns the model's input columns into the transformed row exactly as the pipeline does (a one-hot
column is 1.0 where the value equals its category, numbers are rounded to float32 as the trees compare them)
and runs the compiled kernel (`_treeshap.c`, built by pip at install and called through ctypes, which
releases the GIL). Each raw feature is one player of the Shapley game, so the contributions are exact for the
features a caller sees: base value + their sum = the forest's churn probability.

No scikit-learn, shap or pandas import here: workers import this module.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamflow.server import native
from streamflow.server.onnx_runtime import Columns

_ARRAYS = ("roots", "nodes")
NODE = np.dtype(
    [("frac", "<f8"), ("right", "<i4"), ("thr", "<f4"), ("col", "<u2"), ("raw", "<u2"), ("unused", "<u4")]
)
"""The kernel's node_t: 24 bytes, so one row's walk streams half of what separate arrays did."""
SPEC_FILE = "explainer.json"
QUADRATURE_POINTS = 8
"""The kernel's NQ."""
MAX_RAW_FEATURES = 2 * QUADRATURE_POINTS
"""Most raw features the kernel explains (its MAX_RAW)."""


class ExplainerUnsupported(ValueError):
    """A model whose structure the explainer cannot take (not one-hot/passthrough columns into a forest)."""


@dataclass(frozen=True, eq=False)
class ForestArrays:
    """A forest flattened for TreeSHAP, and how its transformed columns come from the raw features."""

    features: tuple[str, ...]
    """The raw features in the model's order: the players, and the order of `Explainer` output columns."""
    columns: tuple[tuple[int, str | None], ...]
    """Per transformed column: the index of its raw feature, and its category for a one-hot column."""
    base_value: float
    """The expected churn probability as TreeSHAP defines it: the cover-weighted mean of the leaves."""
    arrays: dict[str, np.ndarray]
    """`roots` (each tree's first node) and `nodes` (NODE, in preorder: a node's left child follows it):
    `right` (-1 at a leaf), `col`, `raw`, `thr` (float32, rounded down), and `frac`, the left child's share
    of the node's cover (at a leaf: its class-1 probability over the number of trees)."""

    def __eq__(self, other: object) -> bool:
        """The same forest: equal arrays (a loaded copy maps its arrays; they are still equal)."""
        if not isinstance(other, ForestArrays):
            return NotImplemented
        return (self.features, self.columns, self.base_value) == (
            other.features,
            other.columns,
            other.base_value,
        ) and all(np.array_equal(self.arrays[name], other.arrays[name]) for name in _ARRAYS)

    __hash__ = None  # type: ignore[assignment]

    def save(self, directory: Path) -> None:
        directory.mkdir(mode=0o700)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", self.arrays[name])
        spec = {
            "features": list(self.features),
            "columns": [list(c) for c in self.columns],
            "base_value": self.base_value,
        }
        (directory / SPEC_FILE).write_text(json.dumps(spec))

    @classmethod
    def load(cls, directory: Path) -> ForestArrays:
        """The arrays saved in `directory`, mapped read-only (nothing read until used)."""
        spec = json.loads((directory / SPEC_FILE).read_text())
        return cls(
            features=tuple(spec["features"]),
            columns=tuple((int(raw), category) for raw, category in spec["columns"]),
            base_value=float(spec["base_value"]),
            arrays={name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS},
        )

    def transform(self, columns: Columns) -> np.ndarray:
        """The rows as the forest reads them, (n, transformed columns) in float32, as the pipeline makes
        them: a one-hot column is 1.0 where the value equals its category, and every value goes through
        float64, as the ColumnTransformer's output does, before the trees' float32."""
        first = np.asarray(columns[self.features[0]])
        if len(first) == 1:  # a lone Predict: plain Python for 16 values costs a fifth of numpy's calls
            scalars = [np.asarray(columns[feature])[0] for feature in self.features]
            row = [
                float(scalars[raw]) if category is None else float(str(scalars[raw]) == category)
                for raw, category in self.columns
            ]
            return np.array([row], dtype=np.float32)
        transformed = []
        for raw, category in self.columns:
            values = np.asarray(columns[self.features[raw]])
            if category is None:
                transformed.append(values.astype(np.float64).astype(np.float32))
            else:
                transformed.append((values.astype(str) == category).astype(np.float32))
        return np.ascontiguousarray(np.stack(transformed, axis=1))


def forest_arrays(pipeline: Any, features: Sequence[str]) -> ForestArrays:
    """Flatten `Pipeline(ColumnTransformer(OneHotEncoder | passthrough), RandomForestClassifier)`.

    `features`: the raw features in the model's order. Raises `ExplainerUnsupported` for another shape."""
    steps = getattr(pipeline, "steps", None)
    if not steps or len(steps) != 2:
        raise ExplainerUnsupported("the model is not a two-step pipeline (columns, forest)")
    prepare, forest = steps[0][1], steps[1][1]
    columns = _transformed_columns(prepare, list(features))
    estimators = getattr(forest, "estimators_", None)
    if not estimators or [int(c) for c in getattr(forest, "classes_", [])] != [0, 1]:
        raise ExplainerUnsupported("the model's last step is not a fitted binary forest")
    if int(forest.n_features_in_) != len(columns):
        raise ExplainerUnsupported("the forest reads other columns than the transformer writes")
    raw_of_column = np.array([raw for raw, _ in columns], dtype=np.uint16)
    roots, parts = [], []
    base_value, offset, trees = 0.0, 0, len(estimators)
    for estimator in estimators:
        tree = estimator.tree_
        left, right = tree.children_left, tree.children_right
        internal = left >= 0
        if not np.array_equal(left[internal], np.flatnonzero(internal) + 1):
            raise ExplainerUnsupported("a tree whose nodes are not in preorder")
        cover = tree.weighted_n_node_samples.astype(np.float64)
        counts = tree.value[:, 0, :].astype(np.float64)
        value = np.where(internal, 0.0, counts[:, 1] / counts.sum(axis=1) / trees)
        base_value += float(np.sum(value * cover) / cover[0])  # value is 0 at internal nodes
        nodes = np.zeros(len(left), dtype=NODE)
        nodes["frac"] = np.where(internal, cover[np.maximum(left, 0)] / cover, value)
        nodes["right"] = np.where(internal, right + offset, -1)
        threshold = tree.threshold.astype(np.float32)
        # The largest float32 not above sklearn's float64 threshold: a float32 input goes left of both alike.
        above = threshold.astype(np.float64) > tree.threshold
        threshold[above] = np.nextafter(threshold[above], np.float32(-np.inf))
        nodes["thr"] = np.where(internal, threshold, 0.0)
        column = np.where(internal, tree.feature, 0)
        nodes["col"] = column
        nodes["raw"] = np.where(internal, raw_of_column[column], 0)
        roots.append(offset)
        parts.append(nodes)
        offset += len(left)
    arrays = {"roots": np.array(roots, dtype=np.int32), "nodes": np.concatenate(parts)}
    return ForestArrays(tuple(features), tuple(columns), base_value, arrays)


def _transformed_columns(prepare: Any, features: list[str]) -> list[tuple[int, str | None]]:
    """Per output column of the ColumnTransformer: (raw feature index, category or None)."""
    columns: list[tuple[int, str | None]] = []
    for name, transformer, selected in getattr(prepare, "transformers_", None) or []:
        if transformer == "drop" or (name == "remainder" and not len(selected)):
            continue
        if any(column not in features for column in selected):
            raise ExplainerUnsupported(f"the {name!r} columns are not all model features")
        if type(transformer).__name__ == "OneHotEncoder":
            if getattr(transformer, "drop_idx_", None) is not None:
                raise ExplainerUnsupported("a one-hot encoder that drops categories")
            for column, categories in zip(selected, transformer.categories_, strict=True):
                columns += [(features.index(column), str(category)) for category in categories]
        elif transformer == "passthrough" or type(transformer).__name__ == "FunctionTransformer":
            if transformer != "passthrough" and transformer.func is not None:
                raise ExplainerUnsupported(f"the {name!r} columns go through a function")
            columns += [(features.index(column), None) for column in selected]
        else:
            raise ExplainerUnsupported(f"the {name!r} columns go through {type(transformer).__name__}")
    if not columns:
        raise ExplainerUnsupported("the model's first step is not a fitted ColumnTransformer")
    if len(columns) > 1 << 20 or len(features) > MAX_RAW_FEATURES:
        raise ExplainerUnsupported(f"more than {MAX_RAW_FEATURES} features")
    return columns


def _kernel() -> Any:
    """The compiled TreeSHAP kernel (`_treeshap.c`)."""
    return native.kernel("_treeshap", "streamflow_treeshap", ctypes.c_int)


def kernel_available() -> bool:
    """Whether this install has the compiled kernel."""
    return native.available("_treeshap", "streamflow_treeshap", ctypes.c_int)


@functools.cache
def _gauss_legendre() -> tuple[np.ndarray, np.ndarray]:
    """The kernel's 8 Gauss-Legendre points and weights on [0, 1]: exact for the degree-15 polynomials of
    paths through 16 raw features."""
    points, weights = np.polynomial.legendre.leggauss(QUADRATURE_POINTS)
    return np.ascontiguousarray((points + 1) / 2), np.ascontiguousarray(weights / 2)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="treeshap")


class Explainer:
    """Exact TreeSHAP contributions of a forest's raw features, computed by the compiled kernel."""

    def __init__(self, forest: ForestArrays, threads: int | None = None) -> None:
        """`threads`: most threads one call's rows are split across (default: this process's cores)."""
        self.forest = forest
        self.features = forest.features
        self.base_value = forest.base_value
        self._threads = max(1, threads if threads is not None else len(os.sched_getaffinity(0)))

    def contributions(self, columns: Columns) -> np.ndarray:
        """(n, features) contributions in probability units, in `features` order."""
        x = self.forest.transform(columns)
        phi = np.zeros((len(x), len(self.features)))
        roots = self.forest.arrays["roots"]
        # A row takes milliseconds: worth threads of its own, unlike a row of inference. Fewer rows than
        # threads (a lone Predict) split the trees instead: contributions add up over the trees, and each
        # part goes into its own buffer, summed in a fixed order, so the answer does not depend on timing.
        pool = _pool(self._threads)
        if len(x) >= self._threads:
            rows = _chunks(len(x), self._threads)
            list(pool.map(lambda r: self._run(x[r[0] : r[1]], phi[r[0] : r[1]], roots), rows))
            return phi
        trees = _chunks(len(roots), self._threads)
        parts = np.zeros((len(trees), *phi.shape))
        list(pool.map(lambda i: self._run(x, parts[i], roots[trees[i][0] : trees[i][1]]), range(len(trees))))
        return parts.sum(axis=0)

    def _run(self, x: np.ndarray, phi: np.ndarray, roots: np.ndarray) -> None:
        points, weights = _gauss_legendre()
        status = _kernel()(
            ctypes.c_int(len(roots)),
            native.address(roots),
            native.address(self.forest.arrays["nodes"]),
            native.address(points),
            native.address(weights),
            ctypes.c_int(len(self.features)),
            ctypes.c_int(len(x)),
            ctypes.c_int(x.shape[1]),
            native.address(x),
            native.address(phi),
        )
        if status != 0:
            raise ValueError("the forest has more features than the TreeSHAP kernel takes")


def _chunks(count: int, parts: int) -> list[tuple[int, int]]:
    """`range(count)` in at most `parts` contiguous, nearly equal, non-empty pieces (start, stop)."""
    parts = max(1, min(parts, count))
    return list(itertools.pairwise(count * i // parts for i in range(parts + 1)))


def ranked(features: Sequence[str], contributions: np.ndarray) -> tuple[tuple[str, float], ...]:
    """One row's (feature, contribution) pairs, largest |contribution| first (ties in feature order)."""
    order = np.argsort(-np.abs(contributions), kind="stable")
    return tuple((features[i], float(contributions[i])) for i in order)
