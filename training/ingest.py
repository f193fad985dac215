"""Ingestion of the snapshot tables into PostgreSQL: the production profile's offline store.

Each table (`subscriptions_profile_snapshots`, `usage_agg_30d_snapshots`, `payments_agg_90d_snapshots`,
`support_agg_90d_snapshots`, `churn_labels`) has the primary key ``(user_id, as_of)``. A month is a full
snapshot and is loaded in one transaction across every table: its rows are upserted (unchanged rows are not
rewritten), and rows of that month absent from the new data are deleted. So re-running a month changes
nothing, a corrected month is updated in place, and a failure mid-way (PostgreSQL restarting, a connection
dropped) leaves that month exactly as it was before.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import pandas as pd
import psycopg
from psycopg import sql

from streamflow import postgres
from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import JOIN_KEY, LABELS_TABLE, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.settings import Settings
from streamflow.training import demo_data

log = logging.getLogger(__name__)

APPLICATION_NAME = "streamflow-ingest"
"""The ingesting session's name in ``pg_stat_activity`` (operators and the fault test find it by it)."""

KEYS = (JOIN_KEY, TIMESTAMP_FIELD)
TABLES = (*(spec.table for spec in VIEW_SPECS), LABELS_TABLE)
_FEATURES = {spec.table: tuple(name for name, _ in spec.features) for spec in VIEW_SPECS}


@dataclass
class MonthReport:
    """What one month's transaction did: rows inserted, updated, deleted and left as they were."""

    as_of: str
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    tables: dict[str, dict[str, int]] = field(default_factory=dict)


def _pg_type(dtype: object, column: str, table: str) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_integer_dtype(dtype):
        return "bigint"
    if pd.api.types.is_float_dtype(dtype):
        return "double precision"
    if isinstance(dtype, pd.DatetimeTZDtype):
        return "timestamptz"
    if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
        return "text"
    raise StreamflowError(f"column {column!r} of {table} has type {dtype}, which has no PostgreSQL mapping.")


def _validate(table: str, frame: pd.DataFrame) -> None:
    """Refuse data the tables cannot take before touching the database."""
    if table not in TABLES:
        raise StreamflowError(f"unknown snapshot table {table!r}; expected one of {', '.join(TABLES)}.")
    missing = [c for c in (*KEYS, *_FEATURES.get(table, ())) if c not in frame.columns]
    if missing:
        raise StreamflowError(f"table {table} lacks the columns {', '.join(missing)}.")
    if not isinstance(frame[TIMESTAMP_FIELD].dtype, pd.DatetimeTZDtype):
        raise StreamflowError(f"{table}.{TIMESTAMP_FIELD} must be a timezone-aware timestamp column.")
    if frame[list(KEYS)].isna().any().any():
        raise StreamflowError(f"table {table} has rows with an empty {JOIN_KEY} or {TIMESTAMP_FIELD}.")
    duplicated = frame.duplicated(list(KEYS))
    if duplicated.any():
        first = frame.loc[duplicated, list(KEYS)].iloc[0]
        raise StreamflowError(
            f"table {table} has {int(duplicated.sum())} duplicated ({JOIN_KEY}, {TIMESTAMP_FIELD}) keys, "
            f"e.g. ({first[JOIN_KEY]}, {first[TIMESTAMP_FIELD].date()})."
        )


def _create_table(conn: psycopg.Connection, table: str, frame: pd.DataFrame) -> None:
    """Create the table if missing; an existing one must have the frame's columns."""
    columns = [
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(_pg_type(frame[c].dtype, c, table)))
        for c in frame.columns
    ]
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
            sql.Identifier(table), sql.SQL(", ").join(columns), sql.SQL(", ").join(map(sql.Identifier, KEYS))
        )
    )
    existing = [
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
    ]
    if sorted(existing) != sorted(frame.columns):
        raise StreamflowError(
            f"table {table} already exists with the columns {', '.join(existing)}, but the data has "
            f"{', '.join(frame.columns)}; migrate or drop the table first."
        )


def _load_month(
    conn: psycopg.Connection, table: str, frame: pd.DataFrame, as_of: pd.Timestamp
) -> dict[str, int]:
    """Upsert one month of one table from a COPY-filled staging table; delete rows the month no longer has."""
    target, staging = sql.Identifier(table), sql.Identifier(f"staging_{table}")
    columns = sql.SQL(", ").join(map(sql.Identifier, frame.columns))
    values = [c for c in frame.columns if c not in KEYS]
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(staging, target),
    )
    buffer = io.StringIO()
    # CSV keeps float precision (repr) and lets COPY parse booleans and ISO timestamps; it is far faster than
    # row-by-row inserts at a million users. The month's one `as_of` is written as one preformatted string:
    # formatting a timezone-aware column row by row took most of the CSV time.
    frame.assign(**{TIMESTAMP_FIELD: as_of.isoformat()}).to_csv(buffer, index=False, header=False)
    with conn.cursor() as cursor:
        with cursor.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(staging, columns)) as copy:
            copy.write(buffer.getvalue())
        # Unchanged rows are skipped by the WHERE, so re-running a month rewrites nothing.
        cursor.execute(
            sql.SQL(
                "WITH upserted AS ("
                " INSERT INTO {target} AS t ({columns}) SELECT {columns} FROM {staging}"
                " ON CONFLICT ({keys}) DO UPDATE SET ({values}) = ROW({excluded})"
                " WHERE ({current}) IS DISTINCT FROM ({excluded})"
                " RETURNING (xmax = 0) AS inserted)"
                " SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM upserted"
            ).format(
                target=target,
                staging=staging,
                columns=columns,
                keys=sql.SQL(", ").join(map(sql.Identifier, KEYS)),
                values=sql.SQL(", ").join(map(sql.Identifier, values)),
                excluded=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in values),
                current=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in values),
            )
        )
        inserted, updated = cursor.fetchone() or (0, 0)
        cursor.execute(
            sql.SQL(
                "DELETE FROM {target} AS t WHERE t.{ts} = %s"
                " AND NOT EXISTS (SELECT 1 FROM {staging} AS s WHERE s.{key} = t.{key})"
            ).format(
                target=target,
                staging=staging,
                ts=sql.Identifier(TIMESTAMP_FIELD),
                key=sql.Identifier(JOIN_KEY),
            ),
            (as_of.to_pydatetime(),),
        )
        deleted = cursor.rowcount
    return {
        "inserted": inserted,
        "updated": updated,
        "deleted": deleted,
        "unchanged": len(frame) - inserted - updated,
    }


def ingest_snapshots(settings: Settings, frames: Mapping[str, pd.DataFrame]) -> list[MonthReport]:
    """Load snapshot tables (name -> frame with ``user_id``, ``as_of`` and values) into settings.postgres_dsn.

    Creates the database and the tables if missing. Every month present in the frames is one transaction over
    all the tables; each frame holds the complete snapshot of the months it contains.
    """
    for table, frame in frames.items():
        _validate(table, frame)
    months = sorted({ts for frame in frames.values() for ts in frame[TIMESTAMP_FIELD].unique()})
    where = postgres.describe(settings.postgres_dsn)
    reports: list[MonthReport] = []
    step = "connecting"
    try:
        postgres.ensure_database(settings.postgres_dsn)
        with postgres.connect(settings.postgres_dsn, application_name=APPLICATION_NAME) as conn:
            step = "creating the tables"
            with conn.transaction():
                for table, frame in frames.items():
                    _create_table(conn, table, frame)
            for as_of in months:
                step = f"loading the month {as_of.date()}"
                started = time.perf_counter()
                report = MonthReport(as_of=str(as_of.date()))
                with conn.transaction():
                    for table, frame in frames.items():
                        rows = frame[frame[TIMESTAMP_FIELD] == as_of]
                        if rows.empty:  # this table has no snapshot of that month: leave it as it is
                            continue
                        counts = _load_month(conn, table, rows, as_of)
                        report.tables[table] = counts
                        for key, count in counts.items():
                            setattr(report, key, getattr(report, key) + count)
                log.info(
                    "ingested %s into %s in %.1f s: %d inserted, %d updated, %d deleted, %d unchanged",
                    report.as_of,
                    where,
                    time.perf_counter() - started,
                    report.inserted,
                    report.updated,
                    report.deleted,
                    report.unchanged,
                )
                reports.append(report)
    except psycopg.OperationalError as exc:
        done = ", ".join(r.as_of for r in reports) or "none"
        raise StreamflowError(
            f"PostgreSQL at {where} failed while {step} ({str(exc).strip().splitlines()[0]}); "
            f"that step was rolled back, months already committed: {done}. Re-run the ingestion when the "
            "database is back."
        ) from exc
    except psycopg.Error as exc:
        raise StreamflowError(
            f"PostgreSQL at {where} refused the data while {step}: {str(exc).strip().splitlines()[0]}"
        ) from exc
    return reports


def _user_count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ingest_command(args: argparse.Namespace, settings: Settings) -> int:
    users = args.users or settings.users
    log.info("generating demo data for %d users (seed %d)", users, settings.seed)
    reports = ingest_snapshots(settings, demo_data.generate_tables(users, settings.seed))
    print(json.dumps([asdict(report) for report in reports], indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """`streamflow ingest`: load the demo snapshot tables into PostgreSQL (production profile)."""
    parser = subparsers.add_parser(
        "ingest",
        help="load the demo snapshot tables into PostgreSQL (STREAMFLOW_POSTGRES_DSN)",
        description=(
            "Generate the demo snapshots and upsert them into PostgreSQL, one transaction per month: "
            "re-running changes nothing, a corrected month is updated in place."
        ),
    )
    parser.add_argument(
        "--users", type=_user_count, help="demo users to generate (default: STREAMFLOW_USERS)"
    )
    parser.set_defaults(handler=_ingest_command)
