"""Ingestion of the snapshot tables into a real PostgreSQL: keys, idempotency, corrections, failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pandas as pd
import psycopg
import pytest

from streamflow import postgres
from streamflow.cli import main as streamflow_main
from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import JOIN_KEY, LABELS_TABLE, SNAPSHOT_DATES, TIMESTAMP_FIELD
from streamflow.settings import Settings
from streamflow.training import demo_data
from streamflow.training.ingest import APPLICATION_NAME, TABLES, ingest_snapshots
from tests.fixtures.production import free_port

pytestmark = pytest.mark.production

JAN, FEB = (demo_data.snapshot_timestamp(day) for day in SNAPSHOT_DATES)


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return demo_data.generate_tables(300, 7)


def _month(tables: dict[str, pd.DataFrame], as_of: pd.Timestamp) -> dict[str, pd.DataFrame]:
    return {name: frame[frame[TIMESTAMP_FIELD] == as_of] for name, frame in tables.items()}


def _rows(dsn: str, table: str) -> pd.DataFrame:
    """A table's rows with their xmin (the transaction that last wrote each row), sorted by key."""
    with postgres.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.execute(f'SELECT xmin::text::bigint AS xmin, * FROM "{table}" ORDER BY user_id, as_of')
        columns = [column.name for column in cursor.description or ()]
        return pd.DataFrame(cursor.fetchall(), columns=columns)


def _counts(dsn: str) -> dict[tuple[str, str], int]:
    """Rows per (table, month)."""
    with postgres.connect(dsn) as conn:
        return {
            (table, str(as_of.date())): count
            for table in TABLES
            for as_of, count in conn.execute(f'SELECT as_of, count(*) FROM "{table}" GROUP BY as_of')
        }


def test_ingest_creates_keyed_tables_holding_exactly_the_frames(
    production_settings: Settings, tables: dict[str, pd.DataFrame]
) -> None:
    reports = ingest_snapshots(production_settings, tables)

    assert [r.as_of for r in reports] == ["2024-01-31", "2024-02-29"]
    assert all(r.updated == r.deleted == r.unchanged == 0 for r in reports)
    assert sum(r.inserted for r in reports) == sum(len(frame) for frame in tables.values())
    dsn = production_settings.postgres_dsn
    with postgres.connect(dsn) as conn:
        keys: dict[str, list[str]] = dict(
            conn.execute(
                "SELECT c.relname, array_agg(a.attname ORDER BY k.ord) FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indrelid"
                " CROSS JOIN unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum"
                " WHERE i.indisprimary AND c.relnamespace = 'public'::regnamespace GROUP BY c.relname"
            ).fetchall()
        )
    assert keys == {table: [JOIN_KEY, TIMESTAMP_FIELD] for table in TABLES}
    for table, frame in tables.items():
        stored = _rows(dsn, table).drop(columns="xmin")
        expected = frame.sort_values([JOIN_KEY, TIMESTAMP_FIELD]).reset_index(drop=True)
        # Same values, same types: floats to the last bit, booleans as booleans, timestamps in UTC.
        pd.testing.assert_frame_equal(
            stored.astype({TIMESTAMP_FIELD: expected[TIMESTAMP_FIELD].dtype}), expected, check_dtype=False
        )
        assert stored.drop(columns=[JOIN_KEY, TIMESTAMP_FIELD]).dtypes.tolist() == (
            expected.drop(columns=[JOIN_KEY, TIMESTAMP_FIELD]).dtypes.tolist()
        )


def test_rerunning_a_month_rewrites_nothing(
    production_settings: Settings, tables: dict[str, pd.DataFrame]
) -> None:
    ingest_snapshots(production_settings, tables)
    before = {table: _rows(production_settings.postgres_dsn, table) for table in TABLES}

    reports = ingest_snapshots(production_settings, _month(tables, FEB))

    assert [(r.as_of, r.inserted, r.updated, r.deleted) for r in reports] == [("2024-02-29", 0, 0, 0)]
    assert reports[0].unchanged == sum(len(frame) for frame in _month(tables, FEB).values())
    for table in TABLES:
        # Same xmin: not one row was rewritten, not even with identical values.
        pd.testing.assert_frame_equal(_rows(production_settings.postgres_dsn, table), before[table])


def test_a_corrected_month_is_updated_in_place(
    production_settings: Settings, tables: dict[str, pd.DataFrame]
) -> None:
    ingest_snapshots(production_settings, tables)
    dsn = production_settings.postgres_dsn
    before = {table: _rows(dsn, table) for table in TABLES}
    corrected = _month(tables, FEB)
    profile = corrected["subscriptions_profile_snapshots"].copy()
    fixed_user, removed_user = profile[JOIN_KEY].iloc[0], profile[JOIN_KEY].iloc[1]
    profile.loc[profile[JOIN_KEY] == fixed_user, "monthly_fee"] = 123.45
    corrected["subscriptions_profile_snapshots"] = profile
    corrected = {name: frame[frame[JOIN_KEY] != removed_user] for name, frame in corrected.items()}

    (report,) = ingest_snapshots(production_settings, corrected)

    assert report.tables["subscriptions_profile_snapshots"] == {
        "inserted": 0,
        "updated": 1,
        "deleted": 1,
        "unchanged": len(corrected["subscriptions_profile_snapshots"]) - 1,
    }
    assert all(report.tables[t]["deleted"] == 1 and report.tables[t]["updated"] == 0 for t in TABLES[1:])
    after = _rows(dsn, "subscriptions_profile_snapshots")
    row = after[(after[JOIN_KEY] == fixed_user) & (after[TIMESTAMP_FIELD] == FEB)]
    assert row["monthly_fee"].tolist() == [123.45]
    assert after[(after[JOIN_KEY] == removed_user) & (after[TIMESTAMP_FIELD] == FEB)].empty
    for table in TABLES:
        # January is another month: untouched, row for row.
        old, new = before[table], _rows(dsn, table)
        pd.testing.assert_frame_equal(
            new[new[TIMESTAMP_FIELD] == JAN].reset_index(drop=True),
            old[old[TIMESTAMP_FIELD] == JAN].reset_index(drop=True),
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: {**t, LABELS_TABLE: pd.concat([t[LABELS_TABLE], t[LABELS_TABLE].head(2)])},
            "table churn_labels has 2 duplicated (user_id, as_of) keys, e.g. (7590-VHVEG, 2024-01-31).",
        ),
        (lambda t: {**t, "users": t[LABELS_TABLE]}, "unknown snapshot table 'users'"),
        (
            lambda t: {
                **t,
                "payments_agg_90d_snapshots": t["payments_agg_90d_snapshots"].drop(columns="as_of"),
            },
            "table payments_agg_90d_snapshots lacks the columns as_of.",
        ),
        (
            lambda t: {
                **t,
                LABELS_TABLE: t[LABELS_TABLE].assign(as_of=t[LABELS_TABLE]["as_of"].dt.tz_localize(None)),
            },
            "churn_labels.as_of must be a timezone-aware timestamp column.",
        ),
    ],
    ids=["duplicate-keys", "unknown-table", "missing-key-column", "naive-timestamps"],
)
def test_bad_frames_are_refused_before_anything_is_written(
    production_settings: Settings,
    tables: dict[str, pd.DataFrame],
    change: Callable[[dict[str, pd.DataFrame]], dict[str, pd.DataFrame]],
    message: str,
) -> None:
    with pytest.raises(StreamflowError) as exc:
        ingest_snapshots(production_settings, change(tables))

    assert message in str(exc.value)
    with postgres.connect(production_settings.postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


def test_a_table_of_another_shape_is_refused(
    production_settings: Settings, tables: dict[str, pd.DataFrame]
) -> None:
    with postgres.connect(production_settings.postgres_dsn) as conn:
        conn.execute("CREATE TABLE churn_labels (user_id text, as_of timestamptz, label int)")

    with pytest.raises(StreamflowError) as exc:
        ingest_snapshots(production_settings, tables)

    assert str(exc.value) == (
        "table churn_labels already exists with the columns user_id, as_of, label, but the data has "
        "user_id, as_of, churned; migrate or drop the table first."
    )
    with postgres.connect(production_settings.postgres_dsn) as conn:
        # The other tables' creation was rolled back with the refusal; the foreign table is as it was.
        assert conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall() == [
            ("churn_labels",)
        ]
        assert conn.execute("SELECT count(*) FROM churn_labels").fetchone() == (0,)


def test_unreachable_postgres_is_one_clear_error(
    production_settings: Settings, tables: dict[str, pd.DataFrame]
) -> None:
    port = free_port()
    settings = production_settings.model_copy(
        update={"postgres_dsn": f"postgresql://postgres@127.0.0.1:{port}/streamflow"}
    )

    with pytest.raises(StreamflowError) as exc:
        ingest_snapshots(settings, tables)

    assert str(exc.value).startswith(f"PostgreSQL at 127.0.0.1:{port}/streamflow failed while connecting (")
    assert str(exc.value).endswith(
        "that step was rolled back, months already committed: none. Re-run the ingestion when the database "
        "is back."
    )


def _wait_for_blocked_ingestion(admin: psycopg.Connection, dbname: str) -> int:
    """Pid of the ingesting session once it waits on a lock in dbname."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = %s AND wait_event_type = 'Lock'",
            (dbname, APPLICATION_NAME),
        ).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.05)
    raise AssertionError("the ingestion never blocked on the held lock")


def test_connection_lost_mid_month_leaves_that_month_unwritten(
    production_settings: Settings, tables: dict[str, pd.DataFrame]
) -> None:
    dsn = production_settings.postgres_dsn
    ingest_snapshots(production_settings, _month(tables, JAN))
    february_user = tables[LABELS_TABLE][tables[LABELS_TABLE][TIMESTAMP_FIELD] == FEB][JOIN_KEY].iloc[0]

    # Another session holds an uncommitted insert of one February label, so the ingestion's February
    # transaction writes the four feature tables and then waits on churn_labels, the last table. Terminating
    # its backend there is what a PostgreSQL restart or a dropped connection does to it.
    with (
        postgres.connect(dsn) as blocker,
        postgres.connect(postgres.with_database(dsn, "postgres"), autocommit=True) as admin,
        ThreadPoolExecutor(1) as pool,
    ):
        blocker.execute(
            "INSERT INTO churn_labels (user_id, as_of, churned) VALUES (%s, %s, false)",
            (february_user, FEB.to_pydatetime()),
        )
        running: Future[object] = pool.submit(ingest_snapshots, production_settings, tables)
        pid = _wait_for_blocked_ingestion(admin, postgres.database_name(dsn))
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        error = running.exception(timeout=60)
        blocker.rollback()

    assert isinstance(error, StreamflowError)
    message = str(error)
    assert message.startswith(
        f"PostgreSQL at {postgres.describe(dsn)} failed while loading the month 2024-02-29 ("
    )
    assert "months already committed: 2024-01-31." in message
    jan_counts = {table: int((frame[TIMESTAMP_FIELD] == JAN).sum()) for table, frame in tables.items()}
    # January as committed before; not one February row in any table, although four were written mid-way.
    assert _counts(dsn) == {(table, "2024-01-31"): count for table, count in jan_counts.items()}


def test_ingest_command_loads_the_demo_data(
    production_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMFLOW_PROFILE", "production")
    monkeypatch.setenv("STREAMFLOW_POSTGRES_DSN", production_settings.postgres_dsn)
    monkeypatch.setenv("STREAMFLOW_SEED", "7")

    assert streamflow_main(["ingest", "--users", "300"]) == 0

    printed = capsys.readouterr().out
    assert '"as_of": "2024-01-31"' in printed and '"inserted": 1500' in printed
    expected = demo_data.generate_tables(300, 7)
    assert _counts(production_settings.postgres_dsn) == {
        (table, str(as_of.date())): count
        for table, frame in expected.items()
        for as_of, count in frame[TIMESTAMP_FIELD].value_counts().items()
    }
    with pytest.raises(SystemExit) as exit_info:
        streamflow_main(["ingest", "--users", "0"])
    assert exit_info.value.code == 2
    assert "argument --users: must be at least 1, got 0" in capsys.readouterr().err
