"""A model ready to score: built from a scoring artifact, in a worker or in a single-process server.

A `LoadedModel` is immutable: serving swaps the reference, never mutates it. It imports neither MLflow nor
Feast; serving the forest or ONNX runtime it imports no scikit-learn or pandas either (only the pipeline
fallback unpickles scikit-learn, and feeds it a DataFrame).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from streamflow.server.domain import ModelInfo, ModelRef, ReloadFailure, Runtime
from streamflow.server.explanations import Explainer
from streamflow.server.features import FeatureReader
from streamflow.server.forest_runtime import ForestModel
from streamflow.server.onnx_runtime import Columns, OnnxModel, ProbabilityModel
from streamflow.server.scoring_artifact import ScoringArtifact
from streamflow.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SklearnModel:
    """The scikit-learn pipeline behind the runtime seam: its ColumnTransformer selects columns by name, so it
    gets the columns as a DataFrame."""

    pipeline: ProbabilityModel

    def predict_proba(self, columns: Columns) -> np.ndarray:
        import pandas as pd  # the fallback runtime's own need: an ONNX worker never imports pandas

        probabilities: np.ndarray = self.pipeline.predict_proba(pd.DataFrame(columns))
        return probabilities


def runtime_model(artifact: ScoringArtifact) -> ProbabilityModel:
    """The scoring model of an artifact: the forest kernel over its arrays, the ONNX session, or the unpickled
    pipeline."""
    if artifact.runtime is Runtime.FOREST:
        if artifact.explainer is None:
            raise ValueError("a forest-runtime artifact without the forest's arrays")
        return ForestModel(artifact.explainer)
    if artifact.runtime is Runtime.ONNX:
        return OnnxModel(artifact.model)
    # The control plane pickled what it loaded and validated from the registry; nothing else writes here.
    return SklearnModel(pickle.loads(artifact.model_bytes()))


@dataclass(frozen=True)
class LoadedModel:
    """A validated model version and everything needed to serve it; replaced, never changed, on reload."""

    ref: ModelRef
    stage: str
    aliases: tuple[str, ...]
    run_id: str
    model_uri: str
    training_as_of: str
    metrics: dict[str, float]
    loaded_at: datetime
    runtime: Runtime
    model: ProbabilityModel
    reader: FeatureReader
    explainer: Explainer | None = None
    """Exact TreeSHAP of the model's forest; None when the model cannot be explained."""

    @classmethod
    def from_artifact(cls, artifact: ScoringArtifact, settings: Settings) -> LoadedModel:
        """Build the model and its feature reader; raises what the runtime or the store client raises."""
        return cls(
            ref=artifact.ref,
            stage=artifact.stage,
            aliases=artifact.aliases,
            run_id=artifact.run_id,
            model_uri=artifact.model_uri,
            training_as_of=artifact.training_as_of,
            metrics=dict(artifact.metrics),
            loaded_at=datetime.now(UTC),
            runtime=artifact.runtime,
            model=runtime_model(artifact),
            reader=FeatureReader(artifact.layout, settings),
            explainer=None if artifact.explainer is None else Explainer(artifact.explainer),
        )

    def info(self, last_reload_failure: ReloadFailure | None) -> ModelInfo:
        """What ModelInfo reports about this model."""
        return ModelInfo(
            model=self.ref,
            stage=self.stage,
            aliases=self.aliases,
            run_id=self.run_id,
            model_uri=self.model_uri,
            training_as_of=self.training_as_of,
            feature_service=self.reader.feature_service,
            features=self.reader.schema,
            metrics=dict(self.metrics),
            loaded_at=self.loaded_at,
            runtime=self.runtime,
            last_reload_failure=last_reload_failure,
            base_value=None if self.explainer is None else self.explainer.base_value,
        )

    def with_registry_state(self, stage: str, aliases: tuple[str, ...]) -> LoadedModel:
        """The same model with the stage and aliases the registry now gives its version."""
        if (stage, aliases) == (self.stage, self.aliases):
            return self
        return dataclasses.replace(self, stage=stage, aliases=aliases)


class ModelSource:
    """Where the served model comes from, followed on a background thread: the registry watcher of a
    single-process server or a control plane, or a worker's follower of its control plane. Requests read
    `current` once and keep that model for their whole call."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._last_failure: ReloadFailure | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> LoadedModel | None:
        """The model serving now, or None before the first one."""
        return self._current

    @property
    def last_failure(self) -> ReloadFailure | None:
        """The last version refused since the current model was loaded."""
        return self._last_failure

    @property
    def alive(self) -> bool:
        """Whether the following thread runs (False before `start` and after `stop`)."""
        return self._thread is not None and self._thread.is_alive()

    def subscribe(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call `listener` on the following thread after each swap, and now if a model is already served."""
        self._listeners.append(listener)
        if self._current is not None:
            listener(self._current)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _notify(self, loaded: LoadedModel) -> None:
        """Tell each listener of the swap; one that raises is logged and does not keep the others from it."""
        for listener in list(self._listeners):
            try:
                listener(loaded)
            except Exception:
                log.exception(
                    "a listener of model swaps failed on %s version %s; it serves regardless",
                    loaded.ref.name,
                    loaded.ref.version,
                )
