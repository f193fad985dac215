"""The domain service behind the RPCs: validate ids, read features, score, describe the model.

It knows nothing of gRPC. Each call reads the watcher's current model once, so a swap in the middle of a call
cannot mix two models in one answer.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from streamflow.model_contract import CHURN_CLASS, is_churn
from streamflow.server import metrics, tracing
from streamflow.server.domain import ModelInfo, Prediction
from streamflow.server.errors import (
    ExplanationsUnavailable,
    FeatureError,
    FieldViolation,
    InvalidBatch,
    InvalidUserId,
    ModelNotLoaded,
)
from streamflow.server.explanations import Explainer, kernel_available, ranked
from streamflow.server.features import FeatureRow
from streamflow.server.loaded_model import LoadedModel, ModelSource
from streamflow.server.onnx_runtime import Columns
from streamflow.settings import Settings

if TYPE_CHECKING:
    from streamflow.server.shadow import ShadowScorer

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_USER_ID_LENGTH = 64


def check_user_id(user_id: str) -> None:
    """Raise `InvalidUserId` unless the id is well-formed."""
    problem = user_id_problem(user_id)
    if problem is not None:
        raise InvalidUserId(user_id, problem)


def user_id_problem(user_id: str) -> str | None:
    """What is wrong with a user id, or None when it is well-formed."""
    if not user_id:
        return "must not be empty"
    if len(user_id) > MAX_USER_ID_LENGTH:
        return f"has {len(user_id)} characters, more than {MAX_USER_ID_LENGTH}"
    if not USER_ID_PATTERN.fullmatch(user_id):
        return "holds characters outside [A-Za-z0-9_-]"
    return None


def _explainer(model: LoadedModel) -> Explainer:
    """The model's explainer, or `ExplanationsUnavailable` when it has none or this install no kernel."""
    if model.explainer is None:
        raise ExplanationsUnavailable(model.ref.version, "model")
    if not kernel_available():
        raise ExplanationsUnavailable(model.ref.version, "kernel")
    return model.explainer


def _explained(
    results: list[Prediction | FeatureError], explainer: Explainer, columns: Columns, version: str
) -> list[Prediction | FeatureError]:
    """The predictions with their contributions (`columns` holds the scored rows, in the results' order)."""
    with tracing.span("streamflow.explanation", version, len(columns[explainer.features[0]])):
        contributions = iter(explainer.contributions(columns))
    return [
        result
        if isinstance(result, FeatureError)
        else dataclasses.replace(result, contributions=ranked(explainer.features, next(contributions)))
        for result in results
    ]


class Predictor:
    """Scores users with the watcher's current model."""

    def __init__(self, settings: Settings, watcher: ModelSource, shadow: ShadowScorer | None = None) -> None:
        """`shadow`, when given, also scores a sample of the users after their answers are built."""
        self.settings = settings
        self.watcher = watcher
        self.shadow = shadow

    def batch_predict(
        self, user_ids: Sequence[str], explain: bool = False
    ) -> list[Prediction | FeatureError]:
        """Score many users with one feature read and one inference call; results keep request order."""
        limit = self.settings.max_batch_size
        violations = [
            FieldViolation(f"user_ids[{i}]", problem)
            for i, user_id in enumerate(user_ids)
            if (problem := user_id_problem(user_id)) is not None
        ]
        if not user_ids:
            violations.insert(0, FieldViolation("user_ids", "must hold at least one user id"))
        elif len(user_ids) > limit:
            violations.insert(0, FieldViolation("user_ids", f"holds {len(user_ids)} ids, more than {limit}"))
        if violations:
            raise InvalidBatch(violations, len(user_ids), limit)
        metrics.batch_size("batch_predict", len(user_ids))
        return self.score(user_ids, explain)

    def model_info(self) -> ModelInfo:
        """The model answering now and the last version refused since it was loaded."""
        info = self._model().info(self.watcher.last_failure)
        if self.shadow is None:
            return info
        return dataclasses.replace(info, shadow=self.shadow.report())

    def _model(self) -> LoadedModel:
        model = self.watcher.current
        if model is None:
            raise ModelNotLoaded(self.settings.model_uri)
        return model

    def score(self, user_ids: Sequence[str], explain: bool = False) -> list[Prediction | FeatureError]:
        """Score well-formed ids with one feature read and one inference call; results keep their order.
        With `explain`, each prediction carries its features' contributions.

        Raises `ModelNotLoaded`, `FeatureStoreUnavailable` or `ExplanationsUnavailable`, which concern every
        id alike."""
        model = self._model()
        explainer = _explainer(model) if explain else None  # before any read: the call fails as a whole
        version = model.ref.version
        read_started = time.perf_counter()
        with tracing.span("streamflow.feature_read", version, len(user_ids)):
            read = model.reader.read(user_ids)
        read_s, inference_started = time.perf_counter() - read_started, time.perf_counter()
        rows = [r for r in read if isinstance(r, FeatureRow)]
        with tracing.span("streamflow.inference", version, len(rows)):
            columns = model.reader.columns(rows) if rows else None
            probabilities = (
                model.model.predict_proba(columns)[:, CHURN_CLASS] if columns is not None else np.empty(0)
            )
        metrics.scoring(model, read, probabilities, read_s, time.perf_counter() - inference_started)
        # It only queues the sampled users (never raises, never blocks); the shadow scores them later.
        awaiting = self.shadow.offer(model, rows, probabilities) if self.shadow is not None else None
        scored = iter(enumerate(zip(rows, probabilities, strict=True)))
        results: list[Prediction | FeatureError] = []
        for item in read:
            if isinstance(item, FeatureError):
                results.append(item)
                continue
            index, (row, probability) = next(scored)
            results.append(
                Prediction(
                    user_id=row.user_id,
                    churn=is_churn(probability),
                    churn_probability=float(probability),
                    model=model.ref,
                    features=row.values,
                    shadow=None if awaiting is None else awaiting[index],
                )
            )
        if explainer is not None and columns is not None:
            results = _explained(results, explainer, columns, version)
        return results
