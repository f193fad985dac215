"""In-process measurements: the floor (the server's own feature read and inference, without RPC) and the
Feast SDK path (`get_online_features` feeding the same model), for the same users as the served calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from feast import FeatureStore
from mlflow.tracking import MlflowClient

from streamflow.feature_repo.definitions import JOIN_KEY
from streamflow.feature_repo.store import open_store
from streamflow.server.features import FeatureRow
from streamflow.server.heap import settle_after_load
from streamflow.server.loaded_model import LoadedModel
from streamflow.server.model_loader import ModelTarget, load_model
from streamflow.settings import Settings


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in milliseconds."""

    samples_ms: np.ndarray

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def calls_per_s(self) -> float:
        return float(1000 / self.samples_ms.mean())


def time_calls(call: Callable[[], object], repeat: int, warm_up: int = 5) -> Timing:
    for _ in range(warm_up):
        call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return Timing(np.array(samples))


def load_served_model(settings: Settings) -> tuple[LoadedModel, FeatureStore]:
    """The model the server would load for these settings, loaded the way the server loads it."""
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    version = ModelTarget.parse(settings.model_uri).resolve(client)
    if version is None:
        raise SystemExit(f"no model version behind {settings.model_uri}; run `streamflow bootstrap`")
    store = open_store(settings)
    _, model = load_model(settings, client, store, version)
    settle_after_load()  # as the server does after each load
    return model, store


def floor_call(model: LoadedModel, user_ids: Sequence[str]) -> Callable[[], np.ndarray]:
    """Read the users' features as the server does and score them, in process."""

    def call() -> np.ndarray:
        rows = [r for r in model.reader.read(user_ids) if isinstance(r, FeatureRow)]
        return np.asarray(model.model.predict_proba(model.reader.columns(rows)))

    return call


def feast_sdk_call(
    model: LoadedModel, store: FeatureStore, user_ids: Sequence[str]
) -> Callable[[], np.ndarray]:
    """Read the users' features with the Feast SDK's `get_online_features`; score them with the same model."""
    service = store.get_feature_service(model.reader.feature_service)
    columns = [f.name for f in model.reader.schema]

    def call() -> np.ndarray:
        frame: pd.DataFrame = store.get_online_features(
            features=service, entity_rows={JOIN_KEY: list(user_ids)}
        ).to_df()
        return np.asarray(model.model.predict_proba(frame[columns]))

    return call


def feature_frame(model: LoadedModel, user_ids: Sequence[str]) -> pd.DataFrame:
    """The model's input frame for the users (what `mlflow models serve` is sent)."""
    rows = [r for r in model.reader.read(user_ids) if isinstance(r, FeatureRow)]
    if len(rows) != len(user_ids):
        raise SystemExit("some benchmark users cannot be scored; re-run `streamflow bootstrap`")
    return pd.DataFrame(model.reader.columns(rows))
