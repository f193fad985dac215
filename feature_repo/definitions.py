"""Feast objects of StreamFlow: the `user` entity, four snapshot feature views and the model's FeatureService.

One set of definitions serves both profiles; only the data source of each view changes with the profile
(Parquet files in the embedded profile, PostgreSQL tables in the production profile).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_source import DataSource
from feast.types import Bool, FeastType, Float64, Int64, String

from streamflow.settings import Profile, Settings, load_settings

# Monthly snapshot dates of the demo data; a snapshot's rows carry `as_of` = that date (00:00 UTC).
SNAPSHOT_DATES: tuple[date, ...] = (date(2024, 1, 31), date(2024, 2, 29))

ENTITY_NAME = "user"
JOIN_KEY = "user_id"
TIMESTAMP_FIELD = "as_of"
FEATURE_SERVICE_NAME = "churn_model_v1"
LABELS_TABLE = "churn_labels"


@dataclass(frozen=True)
class ViewSpec:
    """One feature view: its name, snapshot table, time-to-live and typed features."""

    name: str
    table: str
    ttl: timedelta
    features: tuple[tuple[str, FeastType], ...]


# TTLs: the profile changes slowly, so a quarter-old row is still the truth; the rolling aggregates are
# reloaded every month, so a row more than one cycle (35 days) old means a missed load and is not trusted.
VIEW_SPECS: tuple[ViewSpec, ...] = (
    ViewSpec(
        "subscription_profile_fv",
        "subscriptions_profile_snapshots",
        timedelta(days=90),
        (
            ("months_active", Int64),
            ("monthly_fee", Float64),
            ("paperless_billing", Bool),
            ("plan_stream_tv", Bool),
            ("plan_stream_movies", Bool),
            ("net_service", String),
        ),
    ),
    ViewSpec(
        "usage_agg_30d_fv",
        "usage_agg_30d_snapshots",
        timedelta(days=35),
        (
            ("watch_hours_30d", Float64),
            ("avg_session_mins_7d", Float64),
            ("unique_devices_30d", Int64),
            ("skips_7d", Int64),
            ("rebuffer_events_7d", Int64),
        ),
    ),
    ViewSpec(
        "payments_agg_90d_fv",
        "payments_agg_90d_snapshots",
        timedelta(days=35),
        (("failed_payments_90d", Int64),),
    ),
    ViewSpec(
        "support_agg_90d_fv",
        "support_agg_90d_snapshots",
        timedelta(days=35),
        (
            ("support_tickets_90d", Int64),
            ("ticket_avg_resolution_hrs_90d", Float64),
        ),
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(name for spec in VIEW_SPECS for name, _ in spec.features)

user = Entity(
    name=ENTITY_NAME,
    join_keys=[JOIN_KEY],
    value_type=ValueType.STRING,
    description="A StreamFlow subscriber, e.g. 7590-VHVEG.",
)


def _source(spec: ViewSpec, settings: Settings) -> DataSource:
    if settings.profile is Profile.PRODUCTION:
        # Imported here: the embedded profile must not need the PostgreSQL extra at definition time.
        from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

        return PostgreSQLSource(name=spec.table, table=spec.table, timestamp_field=TIMESTAMP_FIELD)
    return FileSource(
        name=spec.table,
        path=str(settings.data_dir / f"{spec.table}.parquet"),
        timestamp_field=TIMESTAMP_FIELD,
    )


def build_views(settings: Settings) -> list[FeatureView]:
    """The four feature views, sourced for the settings' profile."""
    return [
        FeatureView(
            name=spec.name,
            entities=[user],
            ttl=spec.ttl,
            schema=[Field(name=name, dtype=dtype) for name, dtype in spec.features],
            source=_source(spec, settings),
            online=True,
        )
        for spec in VIEW_SPECS
    ]


def build_feature_service(views: list[FeatureView]) -> FeatureService:
    """`churn_model_v1`: the exact 14 features the churn model is trained on and served with."""
    return FeatureService(
        name=FEATURE_SERVICE_NAME,
        features=list(views),
        description="Features of the StreamFlow churn model, version 1.",
    )


# Module-level objects so that `feast apply` run inside this folder finds them too.
_views = build_views(load_settings())
subscription_profile_fv, usage_agg_30d_fv, payments_agg_90d_fv, support_agg_90d_fv = _views
churn_model_v1 = build_feature_service(_views)
