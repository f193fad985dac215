"""What the server served and what happened next: the prediction log read back, and the churn outcomes.

The prediction log is written by the server (server/prediction_sink.py): Parquet files under
`<home>/predictions` in the embedded profile, the partitioned `prediction_log` table in production.

The outcomes are the churn labels that arrive after the predictions: whether each user of a snapshot left in
the month that followed it. The demo's generator draws that outcome with each snapshot (`churn_labels`), so
`streamflow load-outcomes` publishes the month that follows the last snapshot as the `churn_outcomes` table
(labels only: user, the snapshot it follows, when it was observed, churned), which is what a real deployment
would load from billing when the month closes.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd

from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import JOIN_KEY, LABELS_TABLE, TIMESTAMP_FIELD
from streamflow.server.prediction_sink import COLUMNS, IN_PROGRESS, TABLE, log_dsn, log_folder
from streamflow.settings import Profile, Settings
from streamflow.training.demo_data import snapshot_timestamp, table_path

log = logging.getLogger(__name__)

OUTCOMES_TABLE = "churn_outcomes"
"""User, the snapshot the outcome follows (`as_of`), when it was observed (`observed_at`), `churned`."""
OUTCOME_COLUMNS = (JOIN_KEY, TIMESTAMP_FIELD, "observed_at", "churned")


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def read_log(settings: Settings, since: date, until: date | None = None) -> pd.DataFrame:
    """The predictions served from `since` 00:00 UTC to the end of `until` (default: now), one row each:
    `COLUMNS`, with `features` and `feature_event_times` as dicts and `snapshot` (the date of the newest
    feature the prediction used: the snapshot it scored). Raises StreamflowError when there is no log or no
    prediction in the range."""
    start = day_start(since)
    end = day_start(until) + timedelta(days=1) if until is not None else None
    where = f"from {since}" + (f" to {until}" if until else "")
    if settings.profile is Profile.PRODUCTION:
        rows = _read_postgres(settings, start, end)
        origin = f"table {TABLE} at {_describe(settings)}"
    else:
        rows = _read_parquet(settings, start, end)
        origin = str(log_folder(settings))
    if rows.empty:
        raise StreamflowError(
            f"No prediction was logged {where} in {origin}; serve with STREAMFLOW_PREDICTION_LOG=true, score "
            "some users, and stop the server or wait STREAMFLOW_PREDICTION_LOG_ROTATE_S for its file."
        )
    for column in ("features", "feature_event_times"):
        rows[column] = [value if isinstance(value, dict) else json.loads(value) for value in rows[column]]
    rows["served_at"] = pd.to_datetime(rows["served_at"], utc=True)
    rows["snapshot"] = [
        max(pd.Timestamp(t) for t in times.values()).date() if times else pd.NaT
        for times in rows["feature_event_times"]
    ]
    return rows.sort_values("served_at", kind="mergesort").reset_index(drop=True)


def _describe(settings: Settings) -> str:
    from streamflow import postgres

    return postgres.describe(log_dsn(settings))


def _read_parquet(settings: Settings, start: datetime, end: datetime | None) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = log_folder(settings)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        pending = list(folder.glob(f"*{IN_PROGRESS}"))
        hint = f" ({len(pending)} still being written by a running server)" if pending else ""
        raise StreamflowError(f"There is no prediction log in {folder}{hint}; serve and score users first.")
    filters: list[tuple[str, str, Any]] = [("served_at", ">=", pa.scalar(start, pa.timestamp("us", "UTC")))]
    if end is not None:
        filters.append(("served_at", "<", pa.scalar(end, pa.timestamp("us", "UTC"))))
    tables = [pq.read_table(path, filters=filters) for path in files]
    frame: pd.DataFrame = pa.concat_tables(tables).to_pandas()
    return frame[list(COLUMNS)]


def _read_postgres(settings: Settings, start: datetime, end: datetime | None) -> pd.DataFrame:
    import psycopg

    from streamflow import postgres

    query = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE served_at >= %s"
    params: list[object] = [start]
    if end is not None:
        query += " AND served_at < %s"
        params.append(end)
    try:
        with postgres.connect(log_dsn(settings)) as connection:
            rows = connection.execute(query, params).fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise StreamflowError(
            f"There is no {TABLE} table at {_describe(settings)}; serve with STREAMFLOW_PREDICTION_LOG=true "
            "and score users first."
        ) from exc
    except psycopg.OperationalError as exc:
        raise StreamflowError(
            f"PostgreSQL at {_describe(settings)} is unreachable; start it and retry."
        ) from exc
    return pd.DataFrame(rows, columns=list(COLUMNS))


def outcome_frame(settings: Settings) -> pd.DataFrame:
    """The outcomes of the month after the last snapshot, from the demo data (`OUTCOME_COLUMNS`)."""
    from streamflow.training.dataset import _read_rows, snapshot_dates

    dates = snapshot_dates(settings)
    if not dates:
        raise StreamflowError("The demo data has no snapshot; run `streamflow generate` first.")
    last = dates[-1]
    labels = _read_rows(settings, LABELS_TABLE, [JOIN_KEY, "churned"], last)
    month_after = (pd.Timestamp(last) + pd.offsets.MonthEnd(1)).date()
    return pd.DataFrame(
        {
            JOIN_KEY: labels[JOIN_KEY].astype(str),
            TIMESTAMP_FIELD: snapshot_timestamp(last),
            "observed_at": snapshot_timestamp(month_after),
            "churned": labels["churned"].astype(bool),
        }
    )


def load_outcomes(settings: Settings) -> pd.DataFrame:
    """Publish the outcomes of the month after the last snapshot (replacing earlier ones); returns them."""
    frame = outcome_frame(settings)
    if settings.profile is Profile.PRODUCTION:
        from streamflow import postgres

        with postgres.connect(settings.postgres_dsn) as connection, connection.transaction():
            connection.execute(
                f"CREATE TABLE IF NOT EXISTS {OUTCOMES_TABLE} ({JOIN_KEY} text NOT NULL, "
                f"{TIMESTAMP_FIELD} timestamptz NOT NULL, observed_at timestamptz NOT NULL, "
                f"churned boolean NOT NULL, PRIMARY KEY ({JOIN_KEY}, {TIMESTAMP_FIELD}))"
            )
            connection.execute(
                f"DELETE FROM {OUTCOMES_TABLE} WHERE {TIMESTAMP_FIELD} = %s",
                (frame[TIMESTAMP_FIELD].iloc[0].to_pydatetime(),),
            )
            with connection.cursor().copy(
                f"COPY {OUTCOMES_TABLE} ({', '.join(OUTCOME_COLUMNS)}) FROM STDIN"
            ) as copy:
                for row in frame.itertuples(index=False):
                    copy.write_row((row[0], row[1].to_pydatetime(), row[2].to_pydatetime(), bool(row[3])))
    else:
        path = table_path(settings, OUTCOMES_TABLE)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
    log.info("loaded %d outcomes of the month after %s", len(frame), frame[TIMESTAMP_FIELD].iloc[0].date())
    return frame


def read_outcomes(settings: Settings) -> pd.DataFrame:
    """Every loaded outcome (`OUTCOME_COLUMNS`); StreamflowError when none was loaded."""
    missing = StreamflowError(
        "No churn outcomes are loaded yet; run `streamflow load-outcomes` once the month after the "
        "predictions has closed."
    )
    if settings.profile is Profile.PRODUCTION:
        import psycopg

        from streamflow import postgres

        try:
            with postgres.connect(settings.postgres_dsn) as connection:
                rows = connection.execute(
                    f"SELECT {', '.join(OUTCOME_COLUMNS)} FROM {OUTCOMES_TABLE}"
                ).fetchall()
        except psycopg.errors.UndefinedTable as exc:
            raise missing from exc
        frame = pd.DataFrame(rows, columns=list(OUTCOME_COLUMNS))
    else:
        path = table_path(settings, OUTCOMES_TABLE)
        if not path.is_file():
            raise missing
        frame = pd.read_parquet(path)
    if frame.empty:
        raise missing
    frame[TIMESTAMP_FIELD] = pd.to_datetime(frame[TIMESTAMP_FIELD], utc=True)
    return frame
