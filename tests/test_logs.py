"""Structured logs of a real `streamflow serve`: every stderr line is JSON, one access line per call with its
fields, a rate limit that counts what it drops, lifecycle events of their own, and none of the noise a fresh
start used to print. The online store's outage and recovery events come from a real redis-server stopped and
started again under the store breaker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.model_contract import TAG_FINGERPRINT
from streamflow.server.errors import FeatureStoreUnavailable
from streamflow.server.logs import JsonFormatter, TextFormatter
from streamflow.server.store_health import StoreBreaker
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import LogFormat, Profile, Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.processes import START_TIMEOUT_S, serve_env, serving_process
from tests.fixtures.production import start_private_redis
from tests.fixtures.serving import prediction_stub, start_server
from tests.test_server_registry import move_straight_to_production, register_copy

PREDICTION_SERVICE = "/streamflow.serving.v1.PredictionService/"
NOISE = ("noload", "Registry cache expired", "\x1b[", "Downloading artifacts", "alembic", "%|")
"""What a fresh start printed before: SQLAlchemy's deprecation warning, Feast's registry refreshes, ANSI
colour codes, MLflow's download progress bars, MLflow's schema migration chatter."""
WAIT_S = 60.0
"""Liveness bound of the waits below, not a performance expectation."""


def env_for(settings: Settings, **values: str) -> dict[str, str]:
    env = serve_env(
        STREAMFLOW_HOME=str(settings.home),
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_POLL_INTERVAL_S="0.25",
        STREAMFLOW_LOG_FORMAT="json",
        STREAMFLOW_METRICS_PORT="0",
        **values,
    )
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        env.pop(name, None)
    return env


def lines_of(log: Path) -> list[dict[str, Any]]:
    """Every line of a JSON log, parsed: a line that is not JSON fails the test."""
    parsed = []
    for line in log.read_text().splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return parsed


def access_lines(log: Path) -> list[dict[str, Any]]:
    return [line for line in lines_of(log) if line.get("event") == "access"]


def wait_serving(address: str) -> int:
    """Wait until the server reports SERVING; returns how many health checks that took."""
    checks = 0
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            checks += 1
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return checks
            assert time.monotonic() < deadline, "no model loaded"
            time.sleep(0.1)


def test_every_line_is_json_with_one_access_line_per_call_and_no_noise(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with serving_process(env_for(embedded_settings), log) as (_, address):
        wait_serving(address)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            for _ in range(3):
                stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID))
            stub.BatchPredict(pb.BatchPredictRequest(user_ids=[FIRST_USER_ID, "no-such-user"]))
            stub.ModelInfo(pb.ModelInfoRequest())
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(pb.PredictRequest(user_id="not valid!"))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    lines = lines_of(log)
    text = log.read_text()
    assert [noise for noise in NOISE if noise in text] == []
    served = [a for a in access_lines(log) if a["method"].startswith(PREDICTION_SERVICE)]
    assert Counter((a["method"].rsplit("/", 1)[1], a["code"], a["users"]) for a in served) == {
        ("Predict", "OK", 1): 3,
        ("Predict", "INVALID_ARGUMENT", 1): 1,
        ("BatchPredict", "OK", 2): 1,
        ("ModelInfo", "OK", 0): 1,
    }
    for line in served:
        assert set(line) == {
            "time",
            "level",
            "logger",
            "event",
            "method",
            "code",
            "duration_ms",
            "request_id",
            "trace_id",
            "model_version",
            "users",
            "caller",
            "peer",
        }
        assert line["logger"] == "streamflow.access"
        assert line["caller"] == "anonymous"  # no tokens, no client certificates
        assert line["level"] == ("INFO" if line["code"] == "OK" else "WARNING")
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"])
        assert line["trace_id"] == ""  # tracing is off
        assert line["model_version"] == ("1" if line["code"] == "OK" else "")
        assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert len({line["request_id"] for line in served}) == len(served)
    # Lifecycle events are lines of their own, with their fields.
    events = {line["event"]: line for line in lines if "event" in line and line["event"] != "access"}
    assert events["model_loading"]["model_version"] == "1"
    assert events["model_loaded"]["model_version"] == "1"
    assert events["model_loaded"]["previous_version"] is None
    assert "model_swapped" not in events


def test_a_flood_is_rate_limited_and_every_call_is_logged_or_counted(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    rate, ok_calls, failed_calls = 5, 200, 60
    log = tmp_path / "serve.log"
    with serving_process(env_for(embedded_settings, STREAMFLOW_ACCESS_LOG_RATE=str(rate)), log) as (
        _,
        address,
    ):
        checks = wait_serving(address)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            calls = [stub.Predict.future(pb.PredictRequest(user_id=FIRST_USER_ID)) for _ in range(ok_calls)]
            calls += [stub.Predict.future(pb.PredictRequest(user_id="bad id")) for _ in range(failed_calls)]
            codes = Counter(call.code() for call in calls)
        assert codes == {grpc.StatusCode.OK: ok_calls, grpc.StatusCode.INVALID_ARGUMENT: failed_calls}

        # The summary of the flood's last second is due a second after it: wait until every call (the health
        # checks too) is accounted for.
        def accounted() -> tuple[int, int]:
            lines = lines_of(log)
            served = [a for a in lines if a.get("event") == "access"]
            dropped = [line for line in lines if line.get("event") == "access_dropped"]
            ok = sum(a["code"] == "OK" for a in served) + sum(d["ok"] for d in dropped)
            failed = sum(a["code"] != "OK" for a in served) + sum(d["errors"] for d in dropped)
            return ok, failed

        deadline = time.monotonic() + WAIT_S
        while accounted() != (ok_calls + checks, failed_calls) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert accounted() == (ok_calls + checks, failed_calls)

    lines = lines_of(log)
    served = [a for a in lines if a.get("event") == "access"]
    dropped = [line for line in lines if line.get("event") == "access_dropped"]
    assert dropped and all(d["rate"] == rate for d in dropped)
    assert sum(d["ok"] for d in dropped) > 0
    # Each second writes at most `rate` lines of each kind, and failures have their own budget: the flood of
    # successes did not crowd them out.
    # (The limit counts in 1 s windows of the monotonic clock: lines spread over L seconds touch at most
    # floor(L) + 2 of them.)
    times = [datetime.fromisoformat(a["time"]).timestamp() for a in served]
    windows = math.floor(max(times) - min(times)) + 2
    assert sum(a["code"] == "OK" for a in served) <= rate * windows
    assert sum(a["code"] != "OK" for a in served) <= rate * windows
    assert sum(a["code"] == "INVALID_ARGUMENT" for a in served) >= rate
    assert len(dropped) < len(lines)


def test_a_killed_worker_is_logged_as_events_and_replaced(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with serving_process(env_for(embedded_settings, STREAMFLOW_WORKERS="2"), log) as (_, address):
        wait_serving(address)
        deadline = time.monotonic() + WAIT_S
        pids: list[int] = []
        while len(pids) < 2:
            assert time.monotonic() < deadline, "the workers did not both announce themselves"
            pids = [int(m) for m in re.findall(r"worker (\d+) listening", log.read_text())]
            time.sleep(0.1)
        os.kill(pids[0], signal.SIGKILL)
        while not [line for line in lines_of(log) if line.get("event") == "worker_restarted"]:
            assert time.monotonic() < deadline, "no restart logged"
            time.sleep(0.1)

    events = [line for line in lines_of(log) if "event" in line and line["event"] != "access"]
    died = [e for e in events if e["event"] == "worker_died"]
    assert len(died) == 1 and died[0]["pid"] == pids[0] and died[0]["exit"] == "was killed by SIGKILL"
    (restarted,) = [e for e in events if e["event"] == "worker_restarted"]
    assert restarted["worker"] == died[0]["worker"] and restarted["pid"] not in pids
    (stopping,) = [e for e in events if e["event"] == "workers_stopping"]
    assert stopping["workers"] == 2


@contextmanager
def json_events(logger_name: str) -> Iterator[list[dict[str, Any]]]:
    """The lifecycle events `logger_name` logs at INFO and above (as `serve` runs by default), each as the
    server's JSON formatter writes it."""
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            line = json.loads(self.format(record))
            if "event" in line:
                lines.append(line)

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def store_events() -> Iterator[list[dict[str, Any]]]:
    """The lifecycle events the store breaker logs."""
    with json_events("streamflow.server.store_health") as lines:
        yield lines


def test_a_store_outage_and_its_recovery_are_one_event_each(
    tmp_path: Path, store_events: list[dict[str, Any]]
) -> None:
    with start_private_redis(tmp_path / "redis") as private:
        client = redis.Redis(port=private.port, socket_connect_timeout=1, socket_timeout=1)
        breaker = StoreBreaker("redis", (redis.ConnectionError, redis.TimeoutError), probe_interval_s=0.05)
        breaker.call(client.ping)
        private.stop()
        failed = 0
        for _ in range(5):
            with pytest.raises(FeatureStoreUnavailable) as raised:
                breaker.call(client.ping)
            assert "redis" in str(raised.value)
            failed += 1
        private.start()
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                breaker.call(client.ping)
                break
            except FeatureStoreUnavailable:
                assert time.monotonic() < deadline, "the store did not come back"
                time.sleep(0.05)

    events = store_events
    assert [e["event"] for e in events] == ["store_outage", "store_recovered"]
    assert events[0]["store"] == "redis" and events[0]["level"] == "WARNING"
    assert events[0]["error"].startswith("ConnectionError")
    assert events[1]["store"] == "redis" and events[1]["failed_reads"] >= failed


def test_the_log_format_defaults_to_json_in_production_and_text_when_embedded() -> None:
    assert Settings(profile=Profile.PRODUCTION).log_style is LogFormat.JSON
    assert Settings(profile=Profile.EMBEDDED).log_style is LogFormat.TEXT
    assert Settings(profile=Profile.PRODUCTION, log_format=LogFormat.TEXT).log_style is LogFormat.TEXT
    assert Settings(profile=Profile.EMBEDDED, log_format=LogFormat.JSON).log_style is LogFormat.JSON


def test_no_format_writes_ansi_colour_codes() -> None:
    record = logging.LogRecord(
        "mlflow", logging.WARNING, __file__, 1, "\x1b[33mcoloured\x1b[0m %s", ("x",), None
    )

    assert TextFormatter().format(record).endswith("mlflow: coloured x")
    assert json.loads(JsonFormatter().format(record))["message"] == "coloured x"


@pytest.fixture
def watcher_events() -> Iterator[list[dict[str, Any]]]:
    """The lifecycle events the model watcher logs."""
    with json_events("streamflow.server.model_watcher") as lines:
        yield lines


def test_a_refused_version_and_a_swap_are_events_with_their_versions(
    fresh_embedded_settings: Settings, watcher_events: list[dict[str, Any]]
) -> None:
    settings = fresh_embedded_settings
    with start_server(settings) as running, prediction_stub(running.local_address) as stub:
        broken = register_copy(settings, {TAG_FINGERPRINT: None})
        move_straight_to_production(settings, broken)
        deadline = time.monotonic() + WAIT_S
        while not stub.ModelInfo(pb.ModelInfoRequest()).HasField("last_reload_failure"):
            assert time.monotonic() < deadline, "no refusal"
            time.sleep(0.1)
        good = register_copy(settings)
        move_straight_to_production(settings, good)
        while stub.ModelInfo(pb.ModelInfoRequest()).model.version != good:
            assert time.monotonic() < deadline, "no swap"
            time.sleep(0.1)

    by_event = {e["event"]: e for e in watcher_events}
    assert by_event["model_loaded"]["model_version"] == "1"
    refused = by_event["model_refused"]
    assert (refused["level"], refused["model_version"], refused["serving"]) == ("ERROR", broken, "version 1")
    assert refused["reason"] == "it lacks the training pipeline's provenance: no training_set_fingerprint tag"
    swapped = by_event["model_swapped"]
    assert (swapped["model_version"], swapped["previous_version"]) == (good, "1")
    assert [e["event"] for e in watcher_events].count("model_refused") == 1  # once, though polled many times
