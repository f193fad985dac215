"""Open, apply and materialize StreamFlow's Feast feature store for the settings' profile.

The RepoConfig is built in code from Settings (not from a YAML file) so that tests and the CLI point the same
definitions at any home folder. The production profile's RepoConfig lives in ``feature_repo/production.py``.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from feast import FeatureStore, FeatureView, Project, RepoConfig
from feast.errors import FeastObjectNotFoundException

from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import (
    FEATURE_SERVICE_NAME,
    SNAPSHOT_DATES,
    build_feature_service,
    build_views,
    user,
)
from streamflow.settings import Profile, Settings

log = logging.getLogger(__name__)

EMBEDDED_PROJECT = "streamflow"
# Project tag naming the demo data (its fingerprint) whose snapshots the online store holds.
MATERIALIZED_TAG = "materialized_data_fingerprint"


def embedded_repo_config(settings: Settings) -> RepoConfig:
    """Embedded profile: Parquet offline store; SQLite online store, file registry in settings.feast_dir."""
    return RepoConfig(
        project=EMBEDDED_PROJECT,
        provider="local",
        registry={"registry_type": "file", "path": str(settings.feast_dir / "registry.db")},
        online_store={"type": "sqlite", "path": str(settings.feast_dir / "online_store.db")},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=settings.feature_repo,
    )


def open_store(settings: Settings) -> FeatureStore:
    """The FeatureStore of the settings' profile (nothing is created or contacted until it is used)."""
    if settings.profile is Profile.PRODUCTION:
        # Imported here: the embedded profile must not need the production module or its services.
        from streamflow.feature_repo.production import production_repo_config

        config = production_repo_config(settings)
    else:
        settings.feast_dir.mkdir(parents=True, exist_ok=True)
        config = embedded_repo_config(settings)
    return FeatureStore(repo_path=str(settings.feature_repo), config=config)


def apply(settings: Settings) -> None:
    """Register the `user` entity, the four feature views and the FeatureService; idempotent."""
    started = time.monotonic()
    views = build_views(settings)
    store = open_store(settings)
    log.info("applying %d views and %s to project %s", len(views), FEATURE_SERVICE_NAME, store.project)
    store.apply([user, *views, build_feature_service(views)])
    log.info("applied in %.1f s", time.monotonic() - started)


def materialize(settings: Settings, data_fingerprint: str | None = None) -> None:
    """Load every snapshot into the online store (the latest row of each user wins).

    `data_fingerprint`, when given, is recorded in the registry so `is_materialized` can tell later that the
    online store already holds exactly this data.
    """
    started = time.monotonic()
    store = open_store(settings)
    start, end = materialization_window()
    registered = {view.name for view in store.list_feature_views()}
    views = [view.name for view in build_views(settings)]
    if any(name not in registered for name in views):
        raise StreamflowError("The feature views are not registered; run `streamflow apply` first.")
    log.info("materializing snapshots %s to the online store", ", ".join(str(day) for day in SNAPSHOT_DATES))
    # View by view: Feast's local engine reports no progress, and at a million users each view takes a while.
    for number, name in enumerate(views, start=1):
        view_started = time.monotonic()
        store.materialize(start_date=start, end_date=end, feature_views=[name])
        log.info(
            "materialized %s (%d/%d) in %.1f s", name, number, len(views), time.monotonic() - view_started
        )
    project = store.get_project(store.project)
    tags = dict(project.tags)
    if data_fingerprint is None:
        tags.pop(MATERIALIZED_TAG, None)
    else:
        tags[MATERIALIZED_TAG] = data_fingerprint
    store.registry.apply_project(Project(name=project.name, description=project.description, tags=tags))
    log.info("materialized in %.1f s", time.monotonic() - started)


def materialization_window() -> tuple[datetime, datetime]:
    """An interval holding every snapshot's `as_of` (its end is exclusive: a day past the last one)."""
    first, last = min(SNAPSHOT_DATES), max(SNAPSHOT_DATES)
    return (
        datetime(first.year, first.month, first.day, tzinfo=UTC),
        datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1),
    )


def _definition(view: FeatureView) -> tuple[object, ...]:
    """What makes a view's online rows what they are: name, entities, TTL, typed features and source."""
    features = [(feature.name, feature.dtype) for feature in view.features]
    return (view.name, sorted(view.entities), view.ttl, features, view.batch_source)


def is_materialized(settings: Settings, data_fingerprint: str) -> bool:
    """Whether the registry holds the current definitions and the online store this data."""
    store = open_store(settings)
    views = build_views(settings)
    try:
        if store.get_project(store.project).tags.get(MATERIALIZED_TAG) != data_fingerprint:
            return False
        registered = [store.get_feature_view(view.name) for view in views]
        service = store.get_feature_service(FEATURE_SERVICE_NAME)
    except FeastObjectNotFoundException:
        return False
    return [_definition(view) for view in registered] == [_definition(view) for view in views] and (
        service == build_feature_service(views)
    )
