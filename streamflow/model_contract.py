"""What training writes to the MLflow registry and serving reads back: the one contract both sides import.

Training (`training/train.py`) tags every registered version and logs its validation metrics on the version's
run; the server (`server/model_loader.py`) refuses a version that lacks any of them, because only the training
pipeline produces a model whose inputs and provenance it can trust.
"""

from __future__ import annotations

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
