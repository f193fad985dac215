"""`streamflow score-all` in this process (STREAMFLOW_COMPUTE=local): every user of a snapshot scored with
the served version's model and rules, each score equal to the server's Predict; tests/test_ray.py runs it on
Ray."""

from __future__ import annotations

import os
import random
from datetime import UTC, date, datetime, time
from pathlib import Path

import grpc
import pandas as pd
import pytest
import ray

from streamflow import postgres
from streamflow.batch.score_all import CHURN, score_all, scores_path
from streamflow.cli import main
from streamflow.errors import StreamflowError
from streamflow.feature_repo import store
from streamflow.feature_repo.compute import Compute, ray_session
from streamflow.feature_repo.definitions import JOIN_KEY, SNAPSHOT_DATES, TIMESTAMP_FIELD
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.dataset import _read_rows
from streamflow.training.demo_data import snapshot_timestamp, table_path
from tests.fixtures.production import ProductionStack, free_port
from tests.fixtures.serving import prediction_stub, start_server, wire_error
from tests.fixtures.training import relocate_home

LAST = SNAPSHOT_DATES[-1]


def _set_feature(settings: Settings, table: str, user_id: str, column: str, value: object) -> None:
    """Change one user's value in the last snapshot of an offline table (None writes a null)."""
    path = table_path(settings, table)
    frame = pd.read_parquet(path)
    row = (frame[JOIN_KEY] == user_id) & (frame[TIMESTAMP_FIELD] == snapshot_timestamp(LAST))
    assert row.sum() == 1
    if value is None:
        frame[column] = frame[column].astype(
            "Int64" if frame[column].dtype.kind == "i" else frame[column].dtype
        )
    frame.loc[row, column] = value
    frame.to_parquet(path, index=False)


def _age_row(settings: Settings, table: str, user_id: str, day: date, nulls: tuple[str, ...] = ()) -> None:
    """Leave one user only an old row in an offline table: its first snapshot's row, redated to `day`,
    with `nulls` emptied; its later rows are dropped."""
    path = table_path(settings, table)
    frame = pd.read_parquet(path)
    rows = frame.index[frame[JOIN_KEY] == user_id]
    first = frame.loc[rows, TIMESTAMP_FIELD].idxmin()
    frame = frame.drop(index=rows.drop(first))
    frame.loc[first, TIMESTAMP_FIELD] = snapshot_timestamp(day)
    for column in nulls:
        frame[column] = frame[column].astype("Int64" if frame[column].dtype.kind == "i" else object)
        frame.loc[first, column] = None
    frame.to_parquet(path, index=False)


def test_score_all_equals_predict_for_every_sampled_user_and_a_rerun_writes_the_same_rows(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = fresh_embedded_settings
    users = sorted(
        pd.read_parquet(table_path(settings, "subscriptions_profile_snapshots")).query(
            f"{TIMESTAMP_FIELD} == @pd.Timestamp('{LAST}', tz='UTC')"
        )[JOIN_KEY]
    )
    invalid, missing, stale, stale_with_null = users[3], users[7], users[11], users[13]
    _set_feature(settings, "usage_agg_30d_snapshots", invalid, "watch_hours_30d", 10_000.0)  # > 720 h
    _set_feature(settings, "payments_agg_90d_snapshots", missing, "failed_payments_90d", None)
    # Usage last loaded on 2024-01-20: 40 days before the snapshot, beyond the view's 35-day TTL, so Feast's
    # join leaves it null while the online store (loaded from that day on) keeps it and the server says stale.
    old = date(2024, 1, 20)
    _age_row(settings, "usage_agg_30d_snapshots", stale, old)
    _age_row(settings, "payments_agg_90d_snapshots", stale_with_null, old, nulls=("failed_payments_90d",))
    store.materialize(settings)
    window_start = datetime.combine(old, time(), UTC)
    store.open_store(settings).materialize(  # the old rows too, as an incremental load since then has
        start_date=window_start, end_date=store.materialization_window()[1]
    )
    output = tmp_path / "scores"

    summary = score_all(settings, LAST, output_dir=output, batch_users=97)

    scores = pd.read_parquet(scores_path(output, LAST, "1"))
    assert list(scores.columns) == [
        "user_id",
        "as_of",
        "model_version",
        "churn_probability",
        "label",
        "refusal",
    ]
    assert scores["user_id"].tolist() == users  # every user of the snapshot, once, in id order
    assert set(scores["as_of"]) == {LAST} and set(scores["model_version"]) == {"1"}
    by_user = scores.set_index("user_id")
    assert by_user.loc[invalid, "refusal"] == "FEATURES_INVALID"
    assert by_user.loc[missing, "refusal"] == "FEATURES_MISSING"
    assert by_user.loc[stale, "refusal"] == "FEATURES_STALE"
    assert by_user.loc[stale_with_null, "refusal"] == "FEATURES_MISSING"  # the old row's null comes first
    assert pd.isna(by_user.loc[invalid, "churn_probability"]) and by_user.loc[invalid, "label"] is None
    assert summary.users == len(users) and summary.scored == len(users) - 4
    assert dict(summary.refused) == {"FEATURES_INVALID": 1, "FEATURES_MISSING": 2, "FEATURES_STALE": 1}
    scored = scores["churn_probability"].dropna()
    assert summary.top_decile_threshold == pytest.approx(scored.quantile(0.9))
    assert (scored > summary.top_decile_threshold).mean() <= 0.1 + 1 / len(scored)  # a tenth, to a user

    sample = [*random.Random(16).sample(users, 25), invalid, missing, stale, stale_with_null]
    with start_server(settings) as server, prediction_stub(server.local_address) as stub:
        for user_id in sample:
            row = by_user.loc[user_id]
            if row["refusal"] is None:
                prediction = stub.Predict(pb.PredictRequest(user_id=user_id), timeout=10).prediction
                assert prediction.churn_probability == row["churn_probability"], user_id
                assert (pb.ChurnLabel.Name(prediction.label) == "CHURN_LABEL_CHURN") == (
                    row["label"] == CHURN
                )
                assert prediction.model.version == row["model_version"]
            else:
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Predict(pb.PredictRequest(user_id=user_id), timeout=10)
                assert wire_error(refused.value).info.reason == row["refusal"], user_id

    again = score_all(settings, LAST, output_dir=output, batch_users=500)
    pd.testing.assert_frame_equal(pd.read_parquet(scores_path(output, LAST, "1")), scores)  # the same rows
    assert again.to_json() | {"seconds": 0} == summary.to_json() | {"seconds": 0}
    assert [p.name for p in output.rglob("*") if p.is_file()] == ["model_version=1.parquet"]


def test_a_date_without_a_snapshot_is_one_sentence_and_writes_nothing(
    embedded_settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMFLOW_HOME", str(embedded_settings.home))
    monkeypatch.setenv("STREAMFLOW_N_ESTIMATORS", str(embedded_settings.n_estimators))
    monkeypatch.chdir(tmp_path)

    assert main(["score-all", "--as-of", "2024-01-15"]) == 1

    error = capsys.readouterr().err
    assert error.startswith(
        "error: There is no snapshot dated 2024-01-15; the snapshots are dated: 2024-01-31, 2024-02-29."
    )
    assert not (embedded_settings.home / "scores").exists()


@pytest.mark.parametrize(
    "command",
    [["materialize"], ["train"], ["score-all", "--as-of", str(LAST)]],
)
def test_an_unreachable_ray_address_is_one_sentence_at_once_and_writes_nothing(
    command: list[str],
    embedded_settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    relocate_home(embedded_settings.home, home)
    before = _tree(home)
    monkeypatch.setenv("STREAMFLOW_HOME", str(home))
    monkeypatch.setenv("STREAMFLOW_N_ESTIMATORS", str(embedded_settings.n_estimators))
    monkeypatch.setenv("STREAMFLOW_COMPUTE", "ray")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.chdir(tmp_path)

    assert main(command) == 1

    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the log line "starting Ray"
    assert error.startswith(f"error: Cannot reach Ray at RAY_ADDRESS={os.environ['RAY_ADDRESS']} (connecting")
    assert error.endswith("start the cluster, or unset RAY_ADDRESS to run on a local Ray instance.")
    assert _tree(home) == before


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("head-node", "expected host:port, ray://host:port, auto or local"),
        ("ray://head-node:port", "expected host:port, ray://host:port, auto or local"),
        ("no-such-host.invalid:6379", "connecting to no-such-host.invalid:6379: "),
    ],
)
def test_a_malformed_or_unknown_ray_address_is_named_before_ray_starts(
    address: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", address)

    with pytest.raises(StreamflowError) as refused, ray_session(Compute.RAY):
        pytest.fail("the session started")

    assert str(refused.value).startswith(f"Cannot reach Ray at RAY_ADDRESS={address} ({problem}")
    assert not ray.is_initialized()


def _tree(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


def test_a_registry_without_the_served_version_is_refused(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = embedded_settings.model_copy(update={"model_uri": "models:/streamflow_churn@nobody"})

    with pytest.raises(Exception, match="models:/streamflow_churn@nobody names no model version"):
        score_all(settings, LAST, output_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_batch_size_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["score-all", "--as-of", str(date(2024, 2, 29)), "--batch-size", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err


class _Interrupted(Exception):
    pass


def _interrupt_after_first_batch(done: int, total: int) -> None:
    raise _Interrupted(f"stopped after {done} of {total} users")


def test_a_run_that_fails_midway_leaves_the_previous_file_whole_and_no_partial_file(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    before = score_all(embedded_settings, LAST, output_dir=tmp_path, batch_users=100)
    written = scores_path(tmp_path, LAST, "1").read_bytes()

    with pytest.raises(_Interrupted):
        score_all(
            embedded_settings, LAST, output_dir=tmp_path, batch_users=7, progress=_interrupt_after_first_batch
        )

    assert scores_path(tmp_path, LAST, "1").read_bytes() == written
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["model_version=1.parquet"]
    assert before.users > 7


@pytest.mark.production
def test_production_scores_go_to_postgresql_once_per_date_and_version_and_a_failed_run_changes_nothing(
    production_stack: ProductionStack,
) -> None:
    settings = production_stack.settings
    summary = score_all(settings, LAST, batch_users=100)
    query = "SELECT * FROM churn_scores ORDER BY user_id"
    with postgres.connect(settings.postgres_dsn) as conn:
        first = conn.execute(query).fetchall()
    assert len(first) == summary.users > 100 and summary.scored == summary.users
    assert {(row[1], row[2]) for row in first} == {(LAST, summary.model_version)}
    assert summary.output.startswith("PostgreSQL table churn_scores")

    score_all(settings, LAST, batch_users=1000)
    with pytest.raises(_Interrupted):
        score_all(settings, LAST, batch_users=10, progress=_interrupt_after_first_batch)

    with postgres.connect(settings.postgres_dsn) as conn:
        assert conn.execute(query).fetchall() == first  # the re-run replaced its rows; the failed one, none


@pytest.mark.production
def test_production_reads_a_users_rows_up_to_a_date_as_the_embedded_profile_does(
    production_stack: ProductionStack,
) -> None:
    """The read behind FEATURES_STALE in score-all: some users' rows of a table up to a date."""
    columns = [JOIN_KEY, TIMESTAMP_FIELD, "watch_hours_30d"]

    def rows(users: list[str] | None, until: date) -> pd.DataFrame:
        frame = _read_rows(
            production_stack.settings, "usage_agg_30d_snapshots", columns, None, users=users, until=until
        )
        frame[TIMESTAMP_FIELD] = pd.to_datetime(frame[TIMESTAMP_FIELD], utc=True).astype(
            "datetime64[ns, UTC]"
        )
        return frame.sort_values([JOIN_KEY, TIMESTAMP_FIELD]).reset_index(drop=True)

    everyone = rows(None, LAST)
    users = everyone[JOIN_KEY].drop_duplicates().iloc[[0, 5, 9]].tolist()
    first = rows(users, SNAPSHOT_DATES[0])

    expected = everyone[
        everyone[JOIN_KEY].isin(users) & (everyone[TIMESTAMP_FIELD] <= snapshot_timestamp(SNAPSHOT_DATES[0]))
    ]
    assert len(first) > 0 and set(first[TIMESTAMP_FIELD]) == {snapshot_timestamp(SNAPSHOT_DATES[0])}
    pd.testing.assert_frame_equal(first, expected.reset_index(drop=True))
    assert len(rows(users, LAST)) > len(first)
