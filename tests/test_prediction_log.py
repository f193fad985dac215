"""The prediction log: a real `streamflow serve` logs every prediction it served, and a clean SIGTERM loses
none (two workers with a shadow into Parquet in the embedded profile, one process into a partitioned table in
production); a sink that goes down drops and counts instead of blocking, says so once, and is written again
when it is back."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from streamflow import postgres
from streamflow.feature_repo.definitions import JOIN_KEY, SNAPSHOT_DATES, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.server.prediction_log import AwaitingShadow, PredictionLog, Record, RecordQueue
from streamflow.server.prediction_sink import (
    COLUMNS,
    IN_PROGRESS,
    TABLE,
    ParquetSink,
    PostgresSink,
    create_table,
    latest_drift,
    log_folder,
)
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Profile, Settings
from streamflow.training.demo_data import table_path
from streamflow.training.drift import drift
from streamflow.training.evaluation import evaluate
from streamflow.training.served import OUTCOMES_TABLE, load_outcomes
from tests.fixtures.metrics import eventually
from tests.fixtures.processes import START_TIMEOUT_S, read_line
from tests.fixtures.production import ProductionStack, fresh_database
from tests.fixtures.serving import every_worker

STREAMFLOW = Path(sys.executable).parent / "streamflow"
CALLS = 24
"""Predict calls, each on a new connection so the kernel spreads them over both workers."""
BATCH = 10
"""Users of the one BatchPredict."""


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMFLOW_", "MLFLOW_"))}
    return {
        **env,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "STREAMFLOW_PROFILE": settings.profile.value,
        "STREAMFLOW_HOME": str(settings.home),
        "STREAMFLOW_HOST": "127.0.0.1",
        "STREAMFLOW_PORT": "0",
        "STREAMFLOW_METRICS_PORT": "0",
        "STREAMFLOW_HTTP_PORT": "0",
        "STREAMFLOW_PREDICTION_LOG": "true",
        **extra,
    }


def _current_users(settings: Settings, count: int) -> list[str]:
    """Users of the last snapshot (every feature present and fresh)."""
    if settings.profile is Profile.PRODUCTION:
        with postgres.connect(settings.postgres_dsn) as connection:
            found = connection.execute(
                f"SELECT {JOIN_KEY} FROM {VIEW_SPECS[0].table} WHERE {TIMESTAMP_FIELD}::date = %s "
                f"ORDER BY {JOIN_KEY} LIMIT %s",
                (SNAPSHOT_DATES[-1], count),
            ).fetchall()
        return [row[0] for row in found]
    table = pd.read_parquet(table_path(settings, VIEW_SPECS[0].table), columns=[JOIN_KEY, TIMESTAMP_FIELD])
    last = table[TIMESTAMP_FIELD].dt.date == SNAPSHOT_DATES[-1]
    return list(table.loc[last, JOIN_KEY].head(count))


def _serve_and_call(settings: Settings, env: dict[str, str], log_path: Path) -> dict[str, pb.Prediction]:
    """Start `streamflow serve`, make CALLS Predicts and one BatchPredict, SIGTERM it; what each request got,
    by user id. The server must exit 0."""
    workers = int(env["STREAMFLOW_WORKERS"])
    with log_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(STREAMFLOW), "serve"], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        assert process.stdout is not None
        line = read_line(process.stdout, START_TIMEOUT_S)
        assert ("with 2 workers" if workers == 2 else "listening on") in line, log_path.read_text()[-3000:]
        address = line.split("listening on ", 1)[1].split()[0]
        # The shadow loads after the served model: a call before it would go unshadowed.
        if "STREAMFLOW_SHADOW_MODEL_URI" in env:
            eventually(lambda: every_worker(address, _has_shadow), "the shadow loads on every worker")
        served: dict[str, pb.Prediction] = {}
        users = _current_users(settings, CALLS + BATCH)
        for user in users[:CALLS]:
            served[user] = _predict(address, user)
        with grpc.insecure_channel(address) as channel:
            batch = pb_grpc.PredictionServiceStub(channel).BatchPredict(
                pb.BatchPredictRequest(user_ids=users[CALLS:]), timeout=30
            )
        served.update({r.user_id: r.prediction for r in batch.results if r.HasField("prediction")})
        assert len(served) == CALLS + BATCH
        process.send_signal(signal.SIGTERM)  # at once: the records are still queued somewhere
        assert process.wait(60) == 0, log_path.read_text()[-3000:]
        return served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _has_shadow(info: pb.ModelInfoResponse) -> bool:
    return info.shadow.HasField("model")


def _predict(address: str, user: str) -> pb.Prediction:
    """One Predict on a new connection (so the kernel spreads calls over the workers); a worker that has no
    model yet answers UNAVAILABLE, as it tells clients to, retry (a failed call logs nothing)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                reply = pb_grpc.PredictionServiceStub(channel).Predict(
                    pb.PredictRequest(user_id=user), timeout=30
                )
                return reply.prediction
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
        time.sleep(0.1)


def _check_rows(rows: pd.DataFrame, served: dict[str, pb.Prediction], shadowed: bool = False) -> None:
    """The rows are what each user was served; with `shadowed`, each also holds the same model's shadow
    answer (the server's own version as its shadow)."""
    assert len(rows) == len(served)
    assert set(rows.user_id) == set(served)
    assert rows.request_id.nunique() == CALLS + 1  # one per Predict, one for the BatchPredict
    for row in rows.itertuples():
        prediction = served[row.user_id]
        assert row.model_version == prediction.model.version
        assert row.churn_probability == prediction.churn_probability
        assert row.churn == (prediction.label == pb.CHURN_LABEL_CHURN)
        features = row.features if isinstance(row.features, dict) else json.loads(row.features)
        times = row.feature_event_times
        times = times if isinstance(times, dict) else json.loads(times)
        assert len(features) == len(prediction.features) == 14
        for feature in prediction.features:
            assert features[feature.name] == getattr(feature, feature.WhichOneof("value"))
            assert times[feature.name] == feature.event_time.ToJsonString()
        if not shadowed:
            assert row.shadow is None or pd.isna(row.shadow)
            continue
        shadow = row.shadow if isinstance(row.shadow, dict) else json.loads(row.shadow)
        assert shadow == {
            "model_version": prediction.model.version,
            "churn_probability": prediction.churn_probability,
            "churn": prediction.label == pb.CHURN_LABEL_CHURN,
        }


def test_two_workers_log_every_prediction_with_its_shadow_and_sigterm_loses_none_in_parquet(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    folder = log_folder(fresh_embedded_settings)
    shutil.rmtree(folder, ignore_errors=True)  # what other tests' servers logged in the session's home
    env = _env(
        fresh_embedded_settings,
        STREAMFLOW_WORKERS="2",
        STREAMFLOW_MODEL_URI="models:/streamflow_churn/1",
        STREAMFLOW_SHADOW_MODEL_URI="models:/streamflow_churn/1",
    )
    served = _serve_and_call(fresh_embedded_settings, env, tmp_path / "serve.log")

    assert not list(folder.glob(f"*{IN_PROGRESS}"))  # every file completed at shutdown
    rows = pd.concat([pq.read_table(path).to_pandas() for path in sorted(folder.glob("*.parquet"))])
    assert list(rows.columns) == list(COLUMNS)
    _check_rows(rows, served, shadowed=True)


def test_one_process_logs_every_prediction_and_sigterm_loses_none_in_postgres(
    production_stack: ProductionStack, postgres_server: str, tmp_path: Path
) -> None:
    settings = production_stack.settings
    with fresh_database(postgres_server) as log_dsn:
        env = _env(
            settings,
            STREAMFLOW_WORKERS="1",
            STREAMFLOW_POSTGRES_DSN=settings.postgres_dsn,
            STREAMFLOW_REDIS_URL=settings.redis_url,
            STREAMFLOW_REDIS_KEY_PREFIX=settings.redis_key_prefix,
            STREAMFLOW_PREDICTION_LOG_DSN=log_dsn,
        )
        served = _serve_and_call(settings, env, tmp_path / "serve.log")
        with postgres.connect(log_dsn) as connection:
            rows = pd.DataFrame(
                connection.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE}").fetchall(), columns=COLUMNS
            )
            partitions = connection.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = %s::regclass", (TABLE,)
            ).fetchone()
        _check_rows(rows, served)
        assert partitions == (1,)  # this month's

        # evaluate and drift read the table back (the outcomes table goes with the snapshot tables).
        log_settings = settings.model_copy(update={"prediction_log_dsn": log_dsn})
        today = datetime.now(UTC).date()
        try:
            load_outcomes(log_settings)
            [result] = evaluate(log_settings, today, log_to_mlflow=False)
            assert result.users_scored == result.users_with_outcome == len(served)
            report = drift(log_settings, today, log_to_mlflow=False)
            assert report.served_users == report.served_rows == len(served) and len(report.features) == 14
            assert latest_drift(log_settings) == {
                (report.model_version, f.feature): f.psi for f in report.features
            }
        finally:
            with postgres.connect(settings.postgres_dsn) as connection:
                connection.execute(f"DROP TABLE IF EXISTS {OUTCOMES_TABLE}")


def _records(count: int, start: int = 0) -> list[Record]:
    prediction = pb.Prediction(user_id="u", churn_probability=0.25, model=pb.ModelRef(name="m", version="1"))
    return [(1_700_000_000.0 + i, f"r{i}", prediction.SerializeToString(), None) for i in range(start, count)]


@pytest.fixture
def log_database(postgres_server: str) -> Iterator[str]:
    with fresh_database(postgres_server) as dsn:
        yield dsn


def _allow_connections(dsn: str, allowed: bool) -> None:
    name = postgres.database_name(dsn)
    with postgres.connect(postgres.with_database(dsn, "postgres"), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )


def _count(dsn: str) -> int:
    """Rows of the log table (0 before the sink made it)."""
    with postgres.connect(dsn) as connection:
        try:
            row = connection.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    assert row is not None
    return int(row[0])


def test_a_sink_down_drops_and_counts_without_blocking_and_is_written_again_when_back(
    log_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamflow.server.prediction_log")
    dropped_before = _dropped()
    sink = PostgresSink(log_database)
    queue = RecordQueue(sink.write, capacity=50, where="test")
    log = PredictionLog(queue, sink.close)
    queue.offer(_records(10))
    _wait_until(lambda: _count(log_database) == 10)

    _allow_connections(log_database, False)
    try:
        for start in range(10, 210, 10):  # 200 records while the database refuses connections
            queue.offer(_records(start + 10, start))
        _wait_until(lambda: "delivery failed" in caplog.text)
    finally:
        _allow_connections(log_database, True)
    _wait_until(lambda: "the sink is back" in caplog.text)
    queue.offer(_records(220, 210))  # fits again; the episode of drops ends at the latest at close
    assert log.close()

    written = _count(log_database)
    lost = _dropped() - dropped_before
    assert written + lost == 220
    # Kept through the outage: at most a queue's worth, and the batch being retried (itself at most that).
    assert 200 - 50 - 50 <= lost <= 200
    assert caplog.text.count("delivery failed") == 1  # once per outage, not per retry
    assert caplog.text.count("queue full") == 1
    assert f"{int(lost)} records dropped while the queue was full" in caplog.text


def test_a_sink_that_stays_slow_is_one_episode_of_drops_ended_once_none_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamflow.server.prediction_log")
    released = threading.Event()
    written: list[Record] = []

    def slow(records: list[Record]) -> None:  # a sink that takes each batch only once released
        released.wait()
        written.extend(records)

    dropped_before = _dropped()
    queue = RecordQueue(slow, capacity=5, where="test", drop_quiet_s=0.5)
    for start in range(0, 60, 3):  # the thread takes a batch now and then, the queue refills and drops
        queue.offer(_records(start + 3, start))
        time.sleep(0.01)
    released.set()
    _wait_until(lambda: "records dropped while the queue was full" in caplog.text)  # quiet: no offer needed
    lost = _dropped() - dropped_before
    assert caplog.text.count("queue full") == 1
    assert f"{int(lost)} records dropped while the queue was full" in caplog.text
    assert queue.close()
    assert len(written) + lost == 60


def _dropped() -> float:
    return REGISTRY.get_sample_value("streamflow_prediction_log_dropped_total", {"where": "test"}) or 0.0


def _wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_record_awaiting_the_shadow_is_logged_once_whichever_half_comes_last() -> None:
    records: list[Record] = []
    log = PredictionLog(RecordQueue(records.extend, 100, "test"))
    answer, shadow = _records(1)[0], b"shadow"
    served_first, compared_first, given_up = AwaitingShadow(), AwaitingShadow(), AwaitingShadow()
    log.served("r0", [answer[2]] * 4, [served_first, None, compared_first, given_up])
    compared_first.compared(shadow)  # too late: it was served already, so this sends the record
    served_first.compared(shadow)
    served_first.compared(None)  # a second result is ignored
    given_up.compared(None)
    assert log.close()
    assert Counter((r[1], r[2], r[3]) for r in records) == Counter(
        {("r0", answer[2], shadow): 2, ("r0", answer[2], None): 2}
    )
    early = AwaitingShadow()
    early.compared(shadow)  # the shadow before the answer went out: it waits for the answer
    late: list[Record] = []
    second = PredictionLog(RecordQueue(late.extend, 100, "test"))
    early.served(second, answer)
    assert second.close()
    assert late == [(*answer[:3], shadow)]


class _Crash(BaseException):
    """What kills a thread outright (BaseException is not a delivery failure)."""


def test_a_dead_delivery_thread_is_noticed_once_and_replaced_and_its_batch_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "streamflow.server.prediction_log")
    sink = ParquetSink(tmp_path / "predictions", rotate_s=3600)
    crashed = threading.Event()

    def deliver(records: list[Record]) -> None:
        if not crashed.is_set():
            crashed.set()
            raise _Crash
        sink.write(records)

    queue = RecordQueue(deliver, capacity=100, where="test")
    previous = threading.excepthook
    threading.excepthook = lambda args: None  # the crash is the point, not a test failure
    try:
        queue.offer(_records(5))
        crashed.wait(10)
        _wait_until(
            lambda: not any(t.name == "prediction-log-test" and t.is_alive() for t in threading.enumerate())
        )
    finally:
        threading.excepthook = previous
    queue.offer(_records(8, 5))
    assert PredictionLog(queue, sink.close).close()

    files = list((tmp_path / "predictions").glob("*.parquet"))
    rows = pd.concat([pq.read_table(path).to_pandas() for path in files])
    assert sorted(rows.request_id) == sorted(f"r{i}" for i in range(8))
    assert caplog.text.count("the delivery thread died") == 1


def test_the_partitioned_table_takes_rows_of_two_months(log_database: str) -> None:
    sink = PostgresSink(log_database)
    december = _records(3)
    january = [(1_704_067_300.0 + i, f"j{i}", payload, None) for i, (_, _, payload, _) in enumerate(december)]
    sink.write([*december[:1], *january])
    sink.close()
    with psycopg.connect(log_database) as connection:
        create_table(connection)  # idempotent
        partitions = connection.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = %s::regclass ORDER BY 1",
            (TABLE,),
        ).fetchall()
    assert partitions == [(f"{TABLE}_2023_11",), (f"{TABLE}_2024_01",)]


def test_a_parquet_folder_that_cannot_be_written_is_retried_and_written_once_usable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamflow.server.prediction_log")
    folder = tmp_path / "predictions"
    folder.write_text("a file where the folder should be")  # the sink cannot make its folder
    sink = ParquetSink(folder, rotate_s=3600)
    queue = RecordQueue(sink.write, capacity=100, where="test")
    queue.offer(_records(6))
    _wait_until(lambda: "delivery failed" in caplog.text)
    folder.unlink()  # usable again: the batch kept through the outage is written
    _wait_until(lambda: "the sink is back" in caplog.text)
    queue.offer(_records(9, 6))
    assert PredictionLog(queue, sink.close).close()

    rows = pd.concat([pq.read_table(path).to_pandas() for path in folder.glob("*.parquet")])
    assert sorted(rows.request_id) == sorted(f"r{i}" for i in range(9))
    assert caplog.text.count("delivery failed") == 1
