"""What training writes to the MLflow registry and serving reads back: the one contract both sides import.

Training (`training/train.py`) tags every registered version and logs its validation metrics on the version's
run; the server (`server/model_loader.py`) refuses a version that lacks any of them, because only the training
pipeline produces a model whose inputs and provenance it can trust. Training also logs the ONNX export in the
layout below (`training/onnx_export.py`) with a parity report; the server re-checks that parity the same way
(`compare`) before serving the export (`server/onnx_runtime.py`). Both label a probability with `is_churn`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

TAG_FEATURE_SERVICE = "feature_service"
"""Model-version tag: the Feast FeatureService whose features the model takes, e.g. `churn_model_v1`."""

TAG_AS_OF = "as_of"
"""Model-version tag: the snapshot date (ISO, e.g. `2024-01-31`) the training set was built at."""

TAG_FINGERPRINT = "training_set_fingerprint"
"""Model-version tag: sha256 (64 hex digits) of the training set the model was fitted on."""

METRIC_VAL_AUC = "val_auc"
"""Run metric: ROC AUC on the validation split; the promotion gate compares it."""

REQUIRED_METRICS: tuple[str, ...] = (METRIC_VAL_AUC,)
"""Run metrics a version must have logged to be served: proof it went through validation."""


# --- the label --------------------------------------------------------------------------------------------
CHURN_CLASS = 1
"""The label of a churner in the training set, so the pipeline's `predict_proba(columns)[:, 1]` is the churn
probability."""

CHURN_THRESHOLD = 0.5
"""A user is labelled churn when its churn probability is above this."""


def is_churn(probability: float) -> bool:
    """The label of a churn probability, as the pipeline's `predict` gives it: the first class (stay) wins a
    tie, so exactly 0.5 is stay."""
    return probability > CHURN_THRESHOLD


# --- the ONNX export, logged in the version's run -----------------------------------------------------------
ARTIFACT_DIR = "onnx"
"""Folder of the version's run holding the export."""
MODEL_FILE = "model.onnx"
"""The export itself, in `ARTIFACT_DIR`."""
PARITY_FILE = "parity.json"
"""Training's parity report of the export against the pipeline, in `ARTIFACT_DIR`."""
SAMPLE_FILE = "parity_sample.parquet"
"""Validation rows with the pipeline's own churn probabilities (`EXPECTED_COLUMN`), in `ARTIFACT_DIR`."""
EXPECTED_COLUMN = "expected_churn_probability"
"""Column of the logged sample holding the pipeline's churn probability of each row."""
PARITY_TAG = "onnx_parity"
"""Model-version tag set by training: `ok` or `failed`."""
PROBABILITY_TOLERANCE = 1e-5
"""Largest accepted |probability difference| between the ONNX export and the pipeline."""


@dataclass(frozen=True)
class ParityReport:
    """How closely the export reproduces the pipeline on the same rows."""

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
    """Parity of two churn-probability vectors: share of equal labels (`is_churn`) and max |Δp|."""
    if len(expected) == 0:
        return ParityReport(rows=0, label_agreement=0.0, max_abs_probability_diff=float("inf"))
    return ParityReport(
        rows=len(expected),
        label_agreement=float(np.mean((expected > CHURN_THRESHOLD) == (actual > CHURN_THRESHOLD))),
        max_abs_probability_diff=float(np.abs(expected - actual).max()),
    )


# --- shadow evidence, recorded by the server and read by `streamflow promote` ------------------------------
SHADOW_TAG_PREFIX = "shadow_evidence."
"""Model-version tags of a shadow version, one per Production version it was compared with and server run:
`shadow_evidence.<production version>.<run>` holds a `ShadowEvidence` as JSON. A run writes only its own tag,
so restarts and replicas add up instead of overwriting each other (`combined_evidence`)."""


@dataclass(frozen=True)
class ShadowEvidence:
    """How a shadow version answered the live users a Production version answered: summed over one server run,
    or over several (`combined_evidence`)."""

    production_version: str
    users: int
    label_agreement: float
    mean_abs_delta: float
    p99_abs_delta: float
    """The p99 |Δp| bucket bound of one run; over several runs the largest of theirs, a bound of the whole."""
    recorded_at: str
    """When the server recorded it (ISO 8601, UTC); over several runs the latest."""
    run: str = ""
    """The server run that recorded it (its start time and a random part); "" over several runs."""
    runs: int = 1

    @property
    def tag(self) -> str:
        """`shadow_evidence.<production version>.<run>`; without a run, the form tags had before runs."""
        run = f".{self.run}" if self.run else ""
        return f"{SHADOW_TAG_PREFIX}{self.production_version}{run}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShadowEvidence:
        """Raises ValueError (or KeyError, TypeError) when `text` is not one."""
        data = json.loads(text)
        return cls(
            production_version=str(data["production_version"]),
            users=int(data["users"]),
            label_agreement=float(data["label_agreement"]),
            mean_abs_delta=float(data["mean_abs_delta"]),
            p99_abs_delta=float(data["p99_abs_delta"]),
            recorded_at=str(data["recorded_at"]),
            run=str(data.get("run", "")),
            runs=int(data.get("runs", 1)),
        )


def evidence_production_version(tag: str) -> str | None:
    """The Production version a shadow evidence tag is against; None for any other tag."""
    if not tag.startswith(SHADOW_TAG_PREFIX):
        return None
    return tag.removeprefix(SHADOW_TAG_PREFIX).split(".", 1)[0]


def combined_evidence(runs: list[ShadowEvidence]) -> ShadowEvidence:
    """The evidence of several runs against one Production version, as if one server had seen their users."""
    if len(runs) == 1:
        return runs[0]
    users = sum(r.users for r in runs)
    return ShadowEvidence(
        production_version=runs[0].production_version,
        users=users,
        # Each run's agreement is its whole count of agreeing users over its users: round() recovers it.
        label_agreement=sum(round(r.label_agreement * r.users) for r in runs) / users if users else 0.0,
        mean_abs_delta=sum(r.mean_abs_delta * r.users for r in runs) / users if users else 0.0,
        p99_abs_delta=max(r.p99_abs_delta for r in runs),
        recorded_at=max(r.recorded_at for r in runs),
        runs=sum(r.runs for r in runs),
    )
