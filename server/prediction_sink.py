"""Where the prediction log is written: rotated Parquet files (embedded profile) or a partitioned PostgreSQL
table (production profile), by the supervisor (or the one server process), never by a scoring worker.

Why the supervisor: a worker must stay lean (no pyarrow, pandas or psycopg in its memory, under 200 MB) and
several workers writing one table or folder would each hold a writer, a connection and a half-filled file.
The workers send their records over one Unix datagram socket they all inherit (server/prediction_log.py);
the supervisor decodes them here, in batches, on threads of its own. After its workers exited on SIGTERM,
everything they sent is in that socket: the collector reads it to the end, then the sink writes the rest.

The columns, in both sinks: `served_at` (UTC), `request_id`, `user_id`, `model_name`, `model_version`,
`churn_probability`, `churn` (the label served), `features` (JSON object name -> value),
`feature_event_times` (JSON object name -> ISO time) and `shadow` (JSON of a shadow model's result, or null).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import selectors
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from streamflow.server import metrics
from streamflow.server.prediction_log import PredictionLog, Record, RecordQueue, decode_datagram
from streamflow.server.supervised import SupervisedThread
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Profile, Settings

log = logging.getLogger(__name__)

TABLE = "prediction_log"
"""The production profile's table (partitioned by month of `served_at`)."""
FOLDER = "predictions"
"""The embedded profile's folder under the home."""
IN_PROGRESS = ".inprogress"
"""Suffix of the Parquet file being written; renamed to `.parquet` when complete (readers skip it)."""
FAILED = ".failed"
"""Suffix of a file set aside after a failed write (its batch is written again to a new file)."""
ROTATE_ROWS = 200_000
"""Rows of one Parquet file at most (it is also rotated every `prediction_log_rotate_s`)."""
COLUMNS = (
    "served_at",
    "request_id",
    "user_id",
    "model_name",
    "model_version",
    "churn_probability",
    "churn",
    "features",
    "feature_event_times",
    "shadow",
)


def log_folder(settings: Settings) -> Path:
    """The embedded profile's prediction log folder."""
    return (settings.home / FOLDER).resolve()


def log_dsn(settings: Settings) -> str:
    """The production profile's prediction log database."""
    return settings.prediction_log_dsn or settings.postgres_dsn


def _shadow(payload: bytes | None) -> str | None:
    if payload is None:
        return None
    shadow = pb.Prediction.FromString(payload)
    return json.dumps(
        {
            "model_version": shadow.model.version,
            "churn_probability": shadow.churn_probability,
            "churn": shadow.label == pb.CHURN_LABEL_CHURN,
        }
    )


@functools.lru_cache(maxsize=1 << 12)
def _event_time_text(seconds: int, nanos: int) -> str:
    """A feature's event time as `Timestamp.ToJsonString` writes it. Cached: the users of a snapshot share a
    few event times, and formatting each of 14 per record took most of the supervisor's time under load."""
    return Timestamp(seconds=seconds, nanos=nanos).ToJsonString()


@functools.lru_cache(maxsize=1 << 12)
def _times_json(times: tuple[tuple[str, str], ...]) -> str:
    """The `feature_event_times` column of a record: most users of a snapshot share the same times."""
    return json.dumps(dict(times))


def decode(records: list[Record]) -> list[tuple[Any, ...]]:
    """Rows in `COLUMNS` order from the records the server queued."""
    rows = []
    for served_at, request_id, payload, shadow in records:
        prediction = pb.Prediction.FromString(payload)
        features: dict[str, Any] = {}
        times: list[tuple[str, str]] = []
        for feature in prediction.features:  # one pass: each access of a sub-message builds a wrapper
            name, kind, event_time = feature.name, feature.WhichOneof("value"), feature.event_time
            features[name] = None if kind is None else getattr(feature, kind)
            times.append((name, _event_time_text(event_time.seconds, event_time.nanos)))
        rows.append(
            (
                datetime.fromtimestamp(served_at, UTC),
                request_id,
                prediction.user_id,
                prediction.model.name,
                prediction.model.version,
                prediction.churn_probability,
                prediction.label == pb.CHURN_LABEL_CHURN,
                json.dumps(features),
                _times_json(tuple(times)),
                _shadow(shadow),
            )
        )
    return rows


class Sink(Protocol):
    def write(self, records: list[Record]) -> None: ...

    def idle(self) -> None: ...

    def close(self) -> None: ...


class ParquetSink:
    """Rotated Parquet files under `<home>/predictions/`: one file per `rotate_s` seconds or `ROTATE_ROWS`
    rows, named by its first record's time and the writing process, `.inprogress` until complete."""

    def __init__(self, folder: Path, rotate_s: float) -> None:
        import pyarrow as pa

        self._folder = folder
        self._rotate_s = rotate_s
        self._schema = pa.schema(
            [
                ("served_at", pa.timestamp("us", tz="UTC")),
                ("request_id", pa.string()),
                ("user_id", pa.string()),
                ("model_name", pa.string()),
                ("model_version", pa.string()),
                ("churn_probability", pa.float64()),
                ("churn", pa.bool_()),
                ("features", pa.string()),
                ("feature_event_times", pa.string()),
                ("shadow", pa.string()),
            ]
        )
        self._writer: Any = None
        self._path: Path | None = None
        self._opened = 0.0
        self._rows = 0
        self._files = 0
        self._lock = threading.Lock()

    def write(self, records: list[Record]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = decode(records)
        table = pa.Table.from_pylist([dict(zip(COLUMNS, row, strict=True)) for row in rows], self._schema)
        with self._lock:
            try:
                if self._writer is None:
                    self._folder.mkdir(parents=True, exist_ok=True)
                    stamp = rows[0][0].strftime("%Y%m%dT%H%M%S")
                    self._files += 1
                    name = f"part-{stamp}-{os.getpid()}-{self._files}.parquet{IN_PROGRESS}"
                    self._path = self._folder / name
                    self._writer = pq.ParquetWriter(self._path, self._schema)
                    self._opened, self._rows = time.monotonic(), 0
                self._writer.write_table(table)
                self._rows += len(rows)
                if self._rows >= ROTATE_ROWS or time.monotonic() - self._opened >= self._rotate_s:
                    self._complete()
            except Exception:
                self._abandon()
                raise
        metrics.PREDICTION_LOG_WRITTEN.labels("parquet").inc(len(rows))

    def _abandon(self) -> None:
        """After a failed write: the file in progress is completed if its writer still can (it keeps the
        batches written before), else set aside as `.failed` (readers skip it); either way the next batch,
        the failed one again first, goes to a new file, so a broken writer is replaced, never reused."""
        writer, path = self._writer, self._path
        self._writer, self._path = None, None
        if writer is None or path is None:
            return
        try:
            writer.close()
            path.rename(path.with_name(path.name.removesuffix(IN_PROGRESS)))
        except Exception:
            log.exception("prediction log: %s could not be completed; set aside as %s", path.name, FAILED)
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name.removesuffix(IN_PROGRESS) + FAILED))

    def idle(self) -> None:
        """Complete the open file if it is older than `rotate_s` (called when no record comes)."""
        with self._lock:
            if self._writer is not None and time.monotonic() - self._opened >= self._rotate_s:
                self._complete_or_abandon()

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._complete_or_abandon()

    def _complete_or_abandon(self) -> None:
        try:
            self._complete()
        except Exception:
            self._abandon()

    def _complete(self) -> None:
        assert self._path is not None
        self._writer.close()
        self._path.rename(self._path.with_name(self._path.name.removesuffix(IN_PROGRESS)))
        self._writer, self._path = None, None


class PostgresSink:
    """A table partitioned by month of `served_at`, each partition made when its first row comes; rows go
    in with COPY, one per delivery. A connection that broke is opened again at the next delivery."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._connection: Any = None
        self._partitions: set[str] = set()

    def write(self, records: list[Record]) -> None:
        rows = decode(records)
        try:
            connection = self._connect()
            with connection.transaction():
                for month in {row[0].strftime("%Y_%m") for row in rows}:
                    self._partition(connection, month)
                with connection.cursor().copy(f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        except Exception:
            self.close()
            raise
        metrics.PREDICTION_LOG_WRITTEN.labels("postgres").inc(len(rows))

    def idle(self) -> None:
        """Nothing to do between deliveries."""

    def _connect(self) -> Any:
        if self._connection is None or self._connection.closed:
            from streamflow.postgres import connect

            self._connection = connect(self._dsn, application_name="streamflow-prediction-log")
            with self._connection.transaction():
                create_table(self._connection)
            self._partitions.clear()
        return self._connection

    def _partition(self, connection: Any, month: str) -> None:
        if month in self._partitions:
            return
        start = datetime.strptime(month, "%Y_%m").replace(tzinfo=UTC)
        end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE}_{month} PARTITION OF {TABLE} "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
        self._partitions.add(month)

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None


def create_table(connection: Any) -> None:
    """The partitioned table, if missing (the partitions come with their rows)."""
    connection.execute(
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            served_at timestamptz NOT NULL,
            request_id text NOT NULL,
            user_id text NOT NULL,
            model_name text NOT NULL,
            model_version text NOT NULL,
            churn_probability double precision NOT NULL,
            churn boolean NOT NULL,
            features jsonb NOT NULL,
            feature_event_times jsonb NOT NULL,
            shadow jsonb
        ) PARTITION BY RANGE (served_at)"""
    )


DRIFT_FILE = "drift.json"
"""Embedded profile: the latest PSI per feature, written by `streamflow drift` beside the log's files."""
DRIFT_TABLE = "feature_drift"
"""Production profile: the latest PSI per (model version, feature), in the log's database."""
DRIFT_REFRESH_S = 60.0
"""Seconds between two reads of the latest drift by the server (exported as `streamflow_feature_psi`)."""


def create_drift_table(connection: Any) -> None:
    connection.execute(
        f"""CREATE TABLE IF NOT EXISTS {DRIFT_TABLE} (
            model_version text NOT NULL,
            feature text NOT NULL,
            psi double precision NOT NULL,
            measured_at timestamptz NOT NULL,
            PRIMARY KEY (model_version, feature)
        )"""
    )


def latest_drift(settings: Settings) -> dict[tuple[str, str], float]:
    """The latest PSI per (model version, feature) `streamflow drift` recorded; empty when none yet."""
    if settings.profile is Profile.PRODUCTION:
        from streamflow.postgres import connect

        with connect(log_dsn(settings), application_name="streamflow-drift-gauge") as connection:
            create_drift_table(connection)
            rows = connection.execute(f"SELECT model_version, feature, psi FROM {DRIFT_TABLE}").fetchall()
        return {(str(version), str(feature)): float(value) for version, feature, value in rows}
    path = log_folder(settings) / DRIFT_FILE
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    return {(str(recorded["model_version"]), f): float(v) for f, v in recorded["psi"].items()}


class DriftGauge:
    """Exports the latest PSI per feature that `streamflow drift` recorded, re-read every `DRIFT_REFRESH_S`
    on a thread of its own (the supervisor's, or the one server process's): the gauge outlives the command."""

    def __init__(self, settings: Settings, interval_s: float = DRIFT_REFRESH_S) -> None:
        self._settings = settings
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._failing = False
        self._thread = SupervisedThread(
            "drift-gauge", self._run, self._stop, "drift_gauge_restarted", log, "drift gauge"
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def refresh(self) -> None:
        """Read the latest drift once and set the gauge (a failure is logged once until a read succeeds)."""
        try:
            latest = latest_drift(self._settings)
        except Exception:
            if not self._failing:
                log.warning("the latest feature drift could not be read; retrying", exc_info=True)
            self._failing = True
            return
        if self._failing:
            log.info("the latest feature drift is read again")
        self._failing = False
        for (version, feature), value in latest.items():
            metrics.FEATURE_PSI.labels(version, feature).set(value)

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
        while True:
            self.refresh()
            if self._stop.wait(self._interval_s):
                return


def open_sink(settings: Settings) -> Sink:
    """The sink of the settings' profile."""
    if settings.profile is Profile.PRODUCTION:
        return PostgresSink(log_dsn(settings))
    return ParquetSink(log_folder(settings), settings.prediction_log_rotate_s)


def in_process_log(settings: Settings) -> PredictionLog:
    """A server of one process: its queue delivers straight into the sink, and it exports the latest drift
    (a supervisor's `Collector` does both for its workers)."""
    sink = open_sink(settings)
    drift = DriftGauge(settings)
    drift.start()

    def close() -> None:
        drift.stop()
        sink.close()

    return PredictionLog(
        RecordQueue(sink.write, settings.prediction_log_queue_size, "server", sink.idle), close
    )


class Collector:
    """The supervisor's side: reads the workers' datagrams into its queue, which writes the sink.

    `worker_fd` is the descriptor every worker inherits and sends on. `close` (after the workers exited)
    reads what they left in the socket, then delivers and closes."""

    def __init__(self, settings: Settings) -> None:
        self._sink = open_sink(settings)
        self._queue = RecordQueue(
            self._sink.write, settings.prediction_log_queue_size, "supervisor", self._sink.idle
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Room for bursts: the default receive buffer holds a few datagrams of 60 KB.
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._socket, self._theirs = ours, theirs
        self._stop_read, self._stop_write = os.pipe()
        self._stopping = threading.Event()
        self._thread = SupervisedThread(
            "prediction-log-collector",
            self._receive,
            self._stopping,
            "prediction_log_collector_restarted",
            log,
            "prediction log collector",
        )
        self._drift = DriftGauge(settings)

    @property
    def worker_fd(self) -> int:
        return self._theirs.fileno()

    def start(self) -> None:
        self._thread.start()
        self._drift.start()

    def _receive(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            selector.register(self._stop_read, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._stop_read in ready:
                    return
                try:
                    self._read_available()
                except Exception:  # a bug: the loop goes on, or every worker's sends would block
                    log.exception("prediction log: reading the workers' records failed")

    def _read_available(self) -> None:
        self._socket.setblocking(False)
        try:
            while True:
                try:
                    payload = self._socket.recv(1 << 20)
                except BlockingIOError:
                    return
                try:
                    records = decode_datagram(payload)
                except (ValueError, EOFError, TypeError):
                    log.exception("prediction log: a datagram from a worker does not decode; skipped")
                    continue
                self._queue.offer(records)
        finally:
            self._socket.setblocking(True)

    def close(self) -> None:
        """After the workers exited: read what they sent, write it, close the sink."""
        self._drift.stop()
        self._stopping.set()
        os.write(self._stop_write, b"x")
        self._thread.join()
        self._read_available()
        self._queue.close()
        self._sink.close()
        for closing in (self._socket, self._theirs):
            closing.close()
        for fd in (self._stop_read, self._stop_write):
            os.close(fd)
