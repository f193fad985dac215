"""The point-in-time-correct training set of the churn model at one snapshot date.

Entities are the users present in the snapshot dated `as_of`; each row asks Feast for the features as they
were known at `as_of` 00:00 UTC (so a later snapshot can never leak in) and carries that snapshot's label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import date
from typing import Any

import pandas as pd
from feast.types import Bool, FeastType, Float64, Int64, String

from streamflow.errors import StreamflowError
from streamflow.feature_repo.compute import Compute, ray_session
from streamflow.feature_repo.definitions import (
    FEATURE_NAMES,
    FEATURE_SERVICE_NAME,
    JOIN_KEY,
    LABELS_TABLE,
    TIMESTAMP_FIELD,
    VIEW_SPECS,
)
from streamflow.feature_repo.store import opened_store
from streamflow.settings import Profile, Settings
from streamflow.training.demo_data import snapshot_timestamp, table_path
from streamflow.training.fingerprint import frame_fingerprint

log = logging.getLogger(__name__)

LABEL = "churned"
# The snapshot whose rows define "the users present at as_of": every user has a subscription profile.
POPULATION_TABLE = VIEW_SPECS[0].table
_PANDAS_DTYPES: dict[FeastType, str] = {Int64: "int64", Float64: "float64", Bool: "bool", String: "object"}
FEATURE_DTYPES: dict[str, str] = {
    name: _PANDAS_DTYPES[dtype] for spec in VIEW_SPECS for name, dtype in spec.features
}
"""The pandas dtype of each feature column the model takes (the Feast type's natural pandas type)."""


def _read_rows(
    settings: Settings,
    table: str,
    columns: list[str],
    as_of: date | None,
    *,
    users: Sequence[str] | None = None,
    until: date | None = None,
) -> pd.DataFrame:
    """Rows of one snapshot table from the profile's offline data: all of them, or those of the `as_of`
    snapshot, or those dated at or before `until`; of every user, or of `users` only."""
    conditions: list[tuple[str, str, Any]] = []
    if as_of is not None:
        conditions.append((TIMESTAMP_FIELD, "==", snapshot_timestamp(as_of)))
    if until is not None:
        conditions.append((TIMESTAMP_FIELD, "<=", snapshot_timestamp(until)))
    if users is not None:
        conditions.append((JOIN_KEY, "in", list(users)))
    if settings.profile is Profile.PRODUCTION:
        return _read_postgres(settings, table, columns, conditions)
    path = table_path(settings, table)
    if not path.is_file():
        raise StreamflowError(
            f"There is no {table} table in {settings.data_dir}; run `streamflow generate` first."
        )
    return pd.read_parquet(path, columns=columns, filters=conditions or None)


_SQL_OPERATORS = {"==": "=", "<=": "<=", "in": "= ANY"}


def _read_postgres(
    settings: Settings, table: str, columns: list[str], conditions: list[tuple[str, str, Any]]
) -> pd.DataFrame:
    # Imported here: the embedded profile needs no PostgreSQL driver.
    import psycopg
    from psycopg import sql

    from streamflow import postgres

    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table)
    )
    if conditions:
        query = sql.SQL("{} WHERE {}").format(
            query,
            sql.SQL(" AND ").join(
                sql.SQL("{} {} (%s)").format(sql.Identifier(column), sql.SQL(_SQL_OPERATORS[operator]))
                for column, operator, _ in conditions
            ),
        )
    params = tuple(
        value.to_pydatetime() if isinstance(value, pd.Timestamp) else value for _, _, value in conditions
    )
    try:
        with postgres.connect(settings.postgres_dsn) as conn:
            rows = conn.execute(query, params).fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise StreamflowError(
            f"PostgreSQL has no {table} table at {postgres.describe(settings.postgres_dsn)}; "
            "run `streamflow ingest` first."
        ) from exc
    except psycopg.OperationalError as exc:
        raise StreamflowError(
            f"PostgreSQL at {postgres.describe(settings.postgres_dsn)} is unreachable; start it and retry."
        ) from exc
    return pd.DataFrame(rows, columns=columns)


def snapshot_dates(settings: Settings) -> list[date]:
    """The dates of the snapshots present in the offline data."""
    stamps = _read_rows(settings, POPULATION_TABLE, [TIMESTAMP_FIELD], None)[TIMESTAMP_FIELD]
    return sorted({pd.Timestamp(stamp).date() for stamp in stamps.unique()})


def training_set(settings: Settings, as_of: date) -> pd.DataFrame:
    """`user_id`, `as_of`, the FeatureService's features (FEATURE_NAMES order, FEATURE_DTYPES) and `churned`.

    One row per user present in the `as_of` snapshot who has a label, sorted by user_id.
    """
    started = time.monotonic()
    population = _read_rows(settings, POPULATION_TABLE, [JOIN_KEY], as_of)
    if population.empty:
        known = ", ".join(str(day) for day in snapshot_dates(settings)) or "none"
        raise StreamflowError(f"There is no snapshot dated {as_of}; the snapshots are dated: {known}.")
    labels = _read_rows(settings, LABELS_TABLE, [JOIN_KEY, LABEL], as_of)
    if labels.empty:
        raise StreamflowError(
            f"The {LABELS_TABLE} table has no labels dated {as_of}, so there is nothing to learn."
        )
    entities = population.merge(labels, on=JOIN_KEY, how="inner")
    if entities.empty:
        raise StreamflowError(
            f"None of the {len(population)} users of the {as_of} snapshot has a label in {LABELS_TABLE}."
        )
    entities["event_timestamp"] = snapshot_timestamp(as_of)

    compute = Compute(settings.compute)
    log.info("point-in-time join of %d users at %s through Feast (%s)", len(entities), as_of, compute)
    with ray_session(compute), opened_store(settings, compute) as store:
        # The label rides along in the entity frame: Feast returns the entity frame's columns untouched.
        frame = store.get_historical_features(
            entity_df=entities, features=store.get_feature_service(FEATURE_SERVICE_NAME)
        ).to_df()
    complete = frame.dropna(subset=list(FEATURE_NAMES))
    if complete.empty:
        raise StreamflowError(f"Feast found no features for the {len(entities)} labelled users of {as_of}.")
    if len(complete) < len(entities):  # Feast's join itself drops a user whose rows are all past a TTL
        log.warning("dropped %d users of %s with missing features", len(entities) - len(complete), as_of)
    # Every row is as of the snapshot; stated once so each offline store (file: UTC nanoseconds, PostgreSQL:
    # naive microseconds) gives the same column.
    frame = complete.assign(**{TIMESTAMP_FIELD: snapshot_timestamp(as_of)})
    frame = frame[[JOIN_KEY, TIMESTAMP_FIELD, *FEATURE_NAMES, LABEL]].astype(
        {TIMESTAMP_FIELD: "datetime64[ns, UTC]", **FEATURE_DTYPES, LABEL: "bool"}
    )
    frame = frame.sort_values(JOIN_KEY, kind="mergesort").reset_index(drop=True)
    log.info("training set of %s: %d rows in %.1f s", as_of, len(frame), time.monotonic() - started)
    return frame


def training_set_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of a training set's content (rows in their user_id order, columns, types)."""
    return frame_fingerprint(frame)
