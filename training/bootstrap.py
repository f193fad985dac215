"""`streamflow bootstrap`: from nothing to a materialized online store and a Production model, idempotently.

Each step first checks whether its result is already in place and skips itself if so:

1. demo data: the Parquet manifest (embedded) names the users, seed and generator version it was made with;
   the production profile re-ingests, which PostgreSQL turns into no change when the data is the same;
2. Feast: the registry records the fingerprint of the data materialized, next to the definitions applied;
3. model: a Production version trained at the first snapshot on the same training set (fingerprint) with the
   same forest settings is the model bootstrap would train, so there is nothing to do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import SNAPSHOT_DATES
from streamflow.settings import Profile, Settings
from streamflow.training import demo_data
from streamflow.training.dataset import training_set, training_set_fingerprint
from streamflow.training.registry import PromotionRefused, current, promote
from streamflow.training.train import TAG_AS_OF, TAG_FINGERPRINT, mlflow_client, train

log = logging.getLogger(__name__)

AS_OF = SNAPSHOT_DATES[0]
"""The snapshot the demo's Production model is trained at."""


@dataclass(frozen=True)
class BootstrapReport:
    """What a bootstrap found in place and what it did."""

    data_fingerprint: str
    data_written: bool
    materialized: bool
    trained_version: int | None
    production_version: int | None
    seconds: float


def load_demo_data(settings: Settings, users: int, seed: int) -> str:
    """Generate the demo tables into the profile's offline store; returns the data fingerprint."""
    started = time.monotonic()
    log.info("generating demo data: %d users, seed %d", users, seed)
    tables = demo_data.generate_tables(users, seed)
    if settings.profile is Profile.PRODUCTION:
        # Imported here: the embedded profile needs no PostgreSQL driver.
        from streamflow.training.ingest import ingest_snapshots

        ingest_snapshots(settings, tables)
        fingerprint = demo_data.tables_fingerprint(tables)
    else:
        fingerprint = demo_data.write_tables(settings, tables, users, seed)
    rows = sum(len(frame) for frame in tables.values())
    log.info(
        "demo data ready (%d rows in %d tables) in %.1f s", rows, len(tables), time.monotonic() - started
    )
    return fingerprint


def _ensure_data(settings: Settings) -> tuple[str, bool]:
    """(data fingerprint, whether anything was written)."""
    if settings.profile is Profile.EMBEDDED:
        manifest = demo_data.written_manifest(settings)
        if manifest and (manifest["users"], manifest["seed"]) == (settings.users, settings.seed):
            log.info("demo data: already in %s", settings.data_dir)
            return str(manifest["fingerprint"]), False
    return load_demo_data(settings, settings.users, settings.seed), True


def _trained_as_bootstrap_would(
    client: MlflowClient, version: ModelVersion, settings: Settings, fingerprint: str
) -> bool:
    if version.tags.get(TAG_AS_OF) != AS_OF.isoformat() or version.tags.get(TAG_FINGERPRINT) != fingerprint:
        return False
    if version.run_id is None:
        return False
    params = client.get_run(version.run_id).data.params
    return (params.get("n_estimators"), params.get("min_samples_leaf"), params.get("random_state")) == (
        str(settings.n_estimators),
        str(settings.min_samples_leaf),
        str(settings.seed),
    )


def _ensure_model(settings: Settings) -> tuple[int | None, int | None]:
    """(version trained now or None, Production version afterwards)."""
    client = mlflow_client(settings)
    name = settings.model_name
    fingerprint = training_set_fingerprint(training_set(settings, AS_OF))
    production = current(client, name, "Production")
    if production is not None and _trained_as_bootstrap_would(client, production, settings, fingerprint):
        log.info("model: Production is version %s, trained on this data at %s", production.version, AS_OF)
        return None, int(production.version)

    existing = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if _trained_as_bootstrap_would(client, v, settings, fingerprint)
    ]
    trained = None
    if existing:
        candidate = max(int(v.version) for v in existing)
        log.info("model: version %d was already trained on this data; promoting it", candidate)
    else:
        candidate = trained = train(settings, AS_OF).version
    try:
        promote(settings, candidate, "Production")
    except PromotionRefused as refusal:
        # Never silently replace a better model someone put in Production: keep it and say why.
        log.warning("kept the current Production model: %s", refusal)
        return trained, None if production is None else int(production.version)
    return trained, candidate


def bootstrap(settings: Settings) -> BootstrapReport:
    """Demo data, Feast apply + materialize, a model trained at the first snapshot, promoted to Production."""
    started = time.monotonic()
    log.info("bootstrap 1/3: demo data")
    fingerprint, written = _ensure_data(settings)
    log.info("bootstrap 2/3: feature store")
    materialized = not store.is_materialized(settings, fingerprint)
    if materialized:
        store.apply(settings)
        store.materialize(settings, fingerprint)
    else:
        log.info("feature store: definitions applied and this data already materialized")
    log.info("bootstrap 3/3: model")
    trained, production = _ensure_model(settings)
    report = BootstrapReport(
        fingerprint, written, materialized, trained, production, time.monotonic() - started
    )
    log.info("bootstrap done in %.1f s", report.seconds)
    return report
