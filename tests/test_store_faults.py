"""The online store under faults (issue 9, items 4 and 8), over real channels.

- A corrupt row (a value of another type than the registry declares, written through Feast's own
  `online_write_batch` as a buggy loader would; bytes that are no Feast value, written in Feast's layout)
  fails its own user with FEATURES_INVALID and leaves the rest of a batch scored: on the embedded SQLite store
  and on the production profile's Redis.
- A private `redis-server` (never the machine's shared one) is frozen with SIGSTOP, then killed with SIGKILL,
  while client threads call the production-profile server: calls answer UNAVAILABLE FEATURE_STORE_UNAVAILABLE
  well inside their deadline, the outage and the recovery are each logged exactly once, and calls succeed
  again once Redis is back.
- The breaker's rules (fail fast while open, one probe per interval, a success closes) with a stand-in read
  and clock: a real store cannot put a probe's timing or a race between threads on cue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import redis
from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore
from feast.infra.online_stores.sqlite import _table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from grpc_status import rpc_status

from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import JOIN_KEY, VIEW_SPECS
from streamflow.server.app import PredictionServer
from streamflow.server.errors import FeatureStoreUnavailable
from streamflow.server.store_health import StoreBreaker
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.production import PrivateRedis, ProductionStack, start_private_redis
from tests.fixtures.serving import WireError, prediction_stub, start_server, wire_error
from tests.fixtures.training import relocate_home

WRONG_TYPE = "WRONGTYPE-0001"  # months_active (int64) stored as a string_val
GARBLED = "GARBLED-0001"  # watch_hours_30d holds bytes that do not decode as a Feast value
UNDATED = "UNDATED-0001"  # the event time of its payments row does not decode
WRONG_VALUE = "twelve months"  # the raw corrupt value, which no answer may echo
GARBLE = b"\xff\xfe corrupt"
CORRUPT_AT = datetime(2024, 3, 1, tzinfo=UTC)  # after the last snapshot, before the staleness clock
USAGE_VIEW = VIEW_SPECS[1].name
PAYMENTS_VIEW = VIEW_SPECS[2].name
PAYMENTS_FEATURES = [name for name, _ in VIEW_SPECS[2].features]

CALL_TIMEOUT_S = 30.0
"""Deadline of each client call: generous, so an answer of DEADLINE_EXCEEDED means the server stalled."""
WAIT_S = 120.0
"""Upper bound on waiting for each phase of a fault scenario (liveness only, not a measured budget)."""


# --- corrupt rows ----------------------------------------------------------------------------------


def copy_user(feast: FeatureStore, target: str, **overrides: Value) -> None:
    """Write `target` with FIRST_USER_ID's stored rows, `overrides` replacing features' values, through
    Feast's `online_write_batch`: below its typed DataFrame writer, which would refuse a wrong type."""
    provider = feast._get_provider()
    for spec in VIEW_SPECS:
        view = feast.get_feature_view(spec.name)
        names = [name for name, _ in spec.features]
        source = EntityKey(join_keys=[JOIN_KEY], entity_values=[Value(string_val=FIRST_USER_ID)])
        ((_, values),) = provider.online_read(feast.config, view, [source], names)
        assert values is not None, f"{FIRST_USER_ID} has no row in {spec.name}"
        values = {**values, **{k: v for k, v in overrides.items() if k in names}}
        key = EntityKey(join_keys=[JOIN_KEY], entity_values=[Value(string_val=target)])
        provider.online_write_batch(feast.config, view, [(key, values, CORRUPT_AT, None)], None)


def garble(feast: FeatureStore, user_id: str, view: str, feature: str | None) -> None:
    """Overwrite one stored value (or, for None, the event time of the view's row) with bytes that are no
    ValueProto (no timestamp), where Feast's layout keeps it."""
    config = feast.config
    key = EntityKey(join_keys=[JOIN_KEY], entity_values=[Value(string_val=user_id)])
    version = config.entity_key_serialization_version
    if config.online_store.type == "sqlite":
        table = _table_id(config.project, feast.get_feature_view(view))
        serialized = serialize_entity_key(key, entity_key_serialization_version=version)
        with contextlib.closing(sqlite3.connect(config.online_store.path)) as db, db:
            if feature is None:
                statement = f'UPDATE "{table}" SET event_ts = ? WHERE entity_key = ?'
                updated = db.execute(statement, (GARBLE, serialized)).rowcount
            else:
                statement = f'UPDATE "{table}" SET value = ? WHERE entity_key = ? AND feature_name = ?'
                updated = db.execute(statement, (GARBLE, serialized, feature)).rowcount
        assert updated >= 1
    else:
        client = redis_client(feast)
        field_key = f"_ts:{view}".encode() if feature is None else _mmh3(f"{view}:{feature}")
        redis_key = _redis_key(config.project, key, version)
        assert client.execute_command("HEXISTS", redis_key, field_key) == 1
        client.execute_command("HSET", redis_key, field_key, GARBLE)


def redis_client(feast: FeatureStore) -> redis.Redis:
    """The redis-py client Feast's Redis online store reads through."""
    online = feast._get_provider().online_store
    assert isinstance(online, RedisOnlineStore)
    client: redis.Redis = online._get_client(feast.config.online_store)
    return client


def write_corrupt_rows(settings: Settings) -> None:
    with store.opened_store(settings) as feast:
        copy_user(feast, WRONG_TYPE, months_active=Value(string_val=WRONG_VALUE))
        copy_user(feast, GARBLED)
        garble(feast, GARBLED, USAGE_VIEW, "watch_hours_30d")
        copy_user(feast, UNDATED)
        garble(feast, UNDATED, PAYMENTS_VIEW, None)


def assert_corrupt_rows_fail_alone(address: str, store_type: str) -> None:
    corrupt = {
        WRONG_TYPE: ["months_active"],
        GARBLED: ["watch_hours_30d"],
        UNDATED: PAYMENTS_FEATURES,
    }
    user_ids = [FIRST_USER_ID, WRONG_TYPE, GARBLED, UNDATED, FIRST_USER_ID]
    with prediction_stub(address) as stub:
        response = stub.BatchPredict(pb.BatchPredictRequest(user_ids=user_ids), timeout=CALL_TIMEOUT_S)
        failures: dict[str, WireError] = {}
        for user_id in corrupt:
            with pytest.raises(grpc.RpcError) as failure:
                stub.Predict(pb.PredictRequest(user_id=user_id), timeout=CALL_TIMEOUT_S)
            failures[user_id] = wire_error(failure.value)

    assert [r.user_id for r in response.results] == user_ids
    outcomes = [r.WhichOneof("outcome") for r in response.results]
    assert outcomes == ["prediction", "error", "error", "error", "prediction"]
    for result in response.results[1:4]:
        # The batch result carries the very status Predict answers.
        assert WireError.of(result.error).status == failures[result.user_id].status
    for user_id, features in corrupt.items():
        error = failures[user_id]
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.info.reason == "FEATURES_INVALID"
        assert dict(error.info.metadata) == {"userId": user_id, "features": ",".join(features)}
        assert error.failing_features == features
        assert error.precondition is not None
        assert {v.type for v in error.precondition.violations} == {"FEATURE_INVALID"}
        assert user_id in error.status.message
        text = error.status.SerializeToString()
        assert WRONG_VALUE.encode() not in text and GARBLE not in text, f"the raw value leaked ({store_type})"
    descriptions = {
        user_id: [v.description for v in failures[user_id].precondition.violations]  # type: ignore[union-attr]
        for user_id in corrupt
    }
    assert descriptions[WRONG_TYPE] == [
        "the online store holds a string_val for this int64 feature, which Feast stores as int64_val or "
        "int32_val; write the row again with the registered type"
    ]
    assert descriptions[GARBLED] == [
        "the online store holds bytes that do not decode as a Feast value for this double feature, which "
        "Feast stores as double_val or float_val; write the row again with the registered type"
    ]
    assert descriptions[UNDATED] == [
        f"the event time of feature view {PAYMENTS_VIEW}'s row does not decode, so the value's age is "
        "unknown; write the row again"
    ] * len(PAYMENTS_FEATURES)


def test_a_corrupt_sqlite_row_fails_only_its_user(embedded_settings: Settings, tmp_path: Path) -> None:
    home = tmp_path / "home"
    relocate_home(embedded_settings.home, home)
    settings = embedded_settings.model_copy(update={"home": home})
    write_corrupt_rows(settings)

    with start_server(settings) as running:
        assert_corrupt_rows_fail_alone(running.local_address, "sqlite")


# --- Redis: a private redis-server holding the production stack's features -----------------------


@dataclass
class RedisServed:
    """A production-profile server whose online store is a private redis-server the tests may stop."""

    redis: PrivateRedis
    server: PredictionServer
    settings: Settings


@pytest.fixture(scope="module")
def redis_served(
    production_stack: ProductionStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServed]:
    with start_private_redis(tmp_path_factory.mktemp("redis")) as private:
        # The same registry and offline store, materialized into the private Redis.
        settings = production_stack.settings.model_copy(update={"redis_url": private.url})
        with store.opened_store(settings) as feast:
            feast.materialize(*store.materialization_window())
        write_corrupt_rows(settings)
        with start_server(settings) as running:
            yield RedisServed(private, running, settings)


def test_a_corrupt_redis_row_fails_only_its_user(redis_served: RedisServed) -> None:
    assert_corrupt_rows_fail_alone(redis_served.server.local_address, "redis")


def test_the_production_store_bounds_redis_reads_by_the_setting(redis_served: RedisServed) -> None:
    with store.opened_store(
        redis_served.settings.model_copy(update={"online_store_timeout_s": 0.25})
    ) as feast:
        kwargs = redis_client(feast).connection_pool.connection_kwargs

    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)


@dataclass
class CallLog:
    """What client threads saw, call by call: (phase, code, ErrorInfo reason, metadata)."""

    phase: str = "before"
    calls: list[tuple[str, grpc.StatusCode, str, dict[str, str]]] = field(default_factory=list)
    slowest: dict[str, float] = field(default_factory=dict)
    """Per phase, the longest a call took (printed for the report; never asserted: machines are shared)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(
        self, seconds: float, code: grpc.StatusCode, reason: str = "", metadata: dict[str, str] | None = None
    ) -> None:
        with self.lock:
            self.calls.append((self.phase, code, reason, metadata or {}))
            self.slowest[self.phase] = max(seconds, self.slowest.get(self.phase, 0.0))

    def count(self, phase: str, code: grpc.StatusCode) -> int:
        with self.lock:
            return sum(1 for p, c, _, _ in self.calls if (p, c) == (phase, code))

    def wait_for(
        self, phase: str, code: grpc.StatusCode, at_least: int, workers: list[threading.Thread]
    ) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.count(phase, code) < at_least:
            assert all(w.is_alive() for w in workers), "a client thread died"
            assert time.monotonic() < deadline, f"{at_least} x {code.name} in phase {phase}: {self.summary()}"
            time.sleep(0.05)

    def summary(self) -> dict[str, dict[str, int]]:
        with self.lock:
            by_phase: dict[str, Counter[str]] = {}
            for phase, code, _, _ in self.calls:
                by_phase.setdefault(phase, Counter())[code.name] += 1
        return {phase: dict(counts) for phase, counts in by_phase.items()}


def client_loop(address: str, calls: CallLog, stop: threading.Event, batch: bool) -> None:
    """Predict (or a 3-user BatchPredict) in a loop on its own channel, recording each answer's code."""
    with prediction_stub(address) as stub:
        while not stop.is_set():
            started = time.monotonic()
            try:
                if batch:
                    stub.BatchPredict(
                        pb.BatchPredictRequest(user_ids=[FIRST_USER_ID] * 3), timeout=CALL_TIMEOUT_S
                    )
                else:
                    stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as failure:
                status = rpc_status.from_call(failure)  # type: ignore[arg-type]
                seconds = time.monotonic() - started
                if status is None:
                    calls.record(seconds, failure.code())
                else:
                    error = WireError.of(status)
                    calls.record(seconds, error.code, error.info.reason, dict(error.info.metadata))
            else:
                calls.record(time.monotonic() - started, grpc.StatusCode.OK)


@contextlib.contextmanager
def client_threads(address: str, calls: CallLog) -> Iterator[list[threading.Thread]]:
    """Two Predict loops and two BatchPredict loops, so reads run on several server threads at once."""
    stop = threading.Event()
    workers = [
        threading.Thread(target=client_loop, args=(address, calls, stop, batch), daemon=True)
        for batch in (False, False, True, True)
    ]
    for worker in workers:
        worker.start()
    try:
        yield workers
    finally:
        stop.set()
        for worker in workers:
            worker.join(WAIT_S)


def store_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamflow.server.store_health" and r.levelno == level
    ]


def run_outage(
    redis_served: RedisServed,
    caplog: pytest.LogCaptureFixture,
    fail: Callable[[PrivateRedis], None],
    recover: Callable[[PrivateRedis], None],
) -> CallLog:
    """Calls before, during and after an outage `fail` starts and `recover` ends; checks every answer."""
    calls = CallLog()
    private = redis_served.redis
    with (
        caplog.at_level(logging.INFO, logger="streamflow.server.store_health"),
        client_threads(redis_served.server.local_address, calls) as workers,
    ):
        try:
            calls.wait_for("before", grpc.StatusCode.OK, 20, workers)
            calls.phase = "outage"
            fail(private)
            calls.wait_for("outage", grpc.StatusCode.UNAVAILABLE, 50, workers)
        finally:
            calls.phase = "after"
            recover(private)
        calls.wait_for("after", grpc.StatusCode.OK, 20, workers)
        # Let calls running through the recovery settle into a phase of only successes.
        calls.phase = "recovered"
        calls.wait_for("recovered", grpc.StatusCode.OK, 20, workers)

    # The report's numbers (pytest -s): calls per phase and code, and the slowest call of each phase.
    print(f"calls by phase and code: {calls.summary()}; slowest (s): {calls.slowest}")
    seen = {code for _, code, _, _ in calls.calls}
    assert seen <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, calls.summary()
    for phase, code, reason, metadata in calls.calls:
        if code == grpc.StatusCode.UNAVAILABLE:
            assert phase != "before" and phase != "recovered", calls.summary()
            assert (reason, metadata) == ("FEATURE_STORE_UNAVAILABLE", {"onlineStore": "redis"})
    assert calls.count("recovered", grpc.StatusCode.UNAVAILABLE) == 0
    outages, recoveries = store_log(caplog, logging.WARNING), store_log(caplog, logging.INFO)
    assert len(outages) == 1, outages
    assert outages[0].startswith("the redis online store is unreachable")
    assert len(recoveries) == 1, recoveries
    assert recoveries[0].startswith("the redis online store answers again after ")
    failed_reads = int(recoveries[0].split("; ")[1].split(" ")[0])
    # Every failed call is one failed read (a Predict may share its read with others coalesced into it).
    assert (
        1
        <= failed_reads
        <= calls.count("outage", grpc.StatusCode.UNAVAILABLE)
        + calls.count("after", grpc.StatusCode.UNAVAILABLE)
    )
    return calls


def test_a_frozen_redis_fails_calls_fast_and_recovers_once_thawed(
    redis_served: RedisServed, caplog: pytest.LogCaptureFixture
) -> None:
    def freeze(private: PrivateRedis) -> None:
        assert private.process is not None
        os.kill(private.process.pid, signal.SIGSTOP)

    def thaw(private: PrivateRedis) -> None:
        assert private.process is not None
        os.kill(private.process.pid, signal.SIGCONT)

    run_outage(redis_served, caplog, freeze, thaw)


def test_a_killed_redis_fails_calls_fast_and_recovers_once_restarted(
    redis_served: RedisServed, caplog: pytest.LogCaptureFixture
) -> None:
    def kill(private: PrivateRedis) -> None:
        assert private.process is not None
        redis.Redis(port=private.port).save()  # so the restart finds the features again
        private.process.kill()
        private.process.wait(30)

    run_outage(redis_served, caplog, kill, PrivateRedis.start)


# --- the breaker's rules, with a stand-in read and clock ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def unreachable() -> None:
    raise ConnectionError("refused")


def test_the_breaker_fails_fast_while_open_probes_once_per_interval_and_closes_on_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    breaker = StoreBreaker("redis", (ConnectionError,), probe_interval_s=2.0, clock=clock)
    reads: list[str] = []

    def read(outcome: str) -> Callable[[], str]:
        def attempt() -> str:
            reads.append(outcome)
            if outcome == "down":
                unreachable()
            return outcome

        return attempt

    with caplog.at_level(logging.INFO, logger="streamflow.server.store_health"):
        assert breaker.call(read("up")) == "up"
        failures = []
        for outcome in ("down", "up", "up"):  # the outage, then two calls before the probe is due
            with pytest.raises(FeatureStoreUnavailable) as failed:
                breaker.call(read(outcome))
            failures.append(failed.value)
        clock.now += 2.0
        with pytest.raises(FeatureStoreUnavailable):
            breaker.call(read("down"))  # the probe: still down
        with pytest.raises(FeatureStoreUnavailable):
            breaker.call(read("up"))  # the next probe is 2 s away
        clock.now += 2.5
        assert breaker.call(read("up")) == "up"  # the probe succeeds and closes the breaker
        assert breaker.call(read("up")) == "up"

    assert reads == ["up", "down", "down", "up", "up"]
    assert all(f.metadata == {"onlineStore": "redis"} for f in failures)
    assert not breaker.is_open
    assert store_log(caplog, logging.WARNING) == [
        "the redis online store is unreachable (ConnectionError: refused); reads fail at once with "
        "FEATURE_STORE_UNAVAILABLE, one probe read every 2 s, until it answers"
    ]
    assert store_log(caplog, logging.INFO) == [
        "the redis online store answers again after 4.5 s unreachable; 5 read(s) failed meanwhile"
    ]


def test_the_breaker_lets_one_probe_through_while_other_threads_fail_fast() -> None:
    clock = Clock()
    breaker = StoreBreaker("redis", (ConnectionError,), probe_interval_s=1.0, clock=clock)
    with pytest.raises(FeatureStoreUnavailable):
        breaker.call(unreachable)
    clock.now += 1.0
    probing, release = threading.Event(), threading.Event()

    def slow_probe() -> str:
        probing.set()
        assert release.wait(WAIT_S)
        return "up"

    probe = threading.Thread(target=lambda: breaker.call(slow_probe))
    probe.start()
    assert probing.wait(WAIT_S)
    others: list[BaseException] = []

    def other() -> None:
        try:
            breaker.call(lambda: "must not be read")
        except FeatureStoreUnavailable as exc:
            others.append(exc)

    threads = [threading.Thread(target=other) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    release.set()
    probe.join(WAIT_S)

    assert len(others) == 8
    assert not breaker.is_open


def test_an_error_that_is_not_an_outage_leaves_the_breaker_as_it_was() -> None:
    clock = Clock()
    breaker = StoreBreaker("redis", (ConnectionError,), probe_interval_s=1.0, clock=clock)
    with pytest.raises(FeatureStoreUnavailable):
        breaker.call(unreachable)
    clock.now += 1.0

    def corrupt() -> None:
        raise ValueError("bad bytes")

    with pytest.raises(ValueError):
        breaker.call(corrupt)  # the probe met something else: no verdict, the next read probes again
    assert breaker.is_open
    assert breaker.call(lambda: "up") == "up"
    assert not breaker.is_open


def test_reads_let_through_before_an_outage_neither_close_nor_reopen_the_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    breaker = StoreBreaker("redis", (ConnectionError,), probe_interval_s=1.0, clock=clock)
    started = threading.Semaphore(0)
    finish_late_success, finish_late_failure = threading.Event(), threading.Event()

    def late(finish: threading.Event, fails: bool) -> Callable[[], str]:
        def read() -> str:
            started.release()
            assert finish.wait(WAIT_S)
            if fails:
                unreachable()
            return "up"

        return read

    outcomes: list[str] = []

    def call(read: Callable[[], str]) -> None:
        try:
            outcomes.append(breaker.call(read))
        except FeatureStoreUnavailable:
            outcomes.append("unavailable")

    with caplog.at_level(logging.INFO, logger="streamflow.server.store_health"):
        # Two reads on their way while the store still answers...
        slow = [
            threading.Thread(target=call, args=(late(finish_late_success, False),)),
            threading.Thread(target=call, args=(late(finish_late_failure, True),)),
        ]
        for thread in slow:
            thread.start()
        assert started.acquire(timeout=WAIT_S) and started.acquire(timeout=WAIT_S)
        # ...then an outage: the late success must not close the breaker.
        with pytest.raises(FeatureStoreUnavailable):
            breaker.call(unreachable)
        finish_late_success.set()
        slow[0].join(WAIT_S)
        assert breaker.is_open
        clock.now += 1.0
        assert breaker.call(lambda: "up") == "up"  # the probe closes it
        # The late failure arrives after the recovery: it must not reopen the breaker.
        finish_late_failure.set()
        slow[1].join(WAIT_S)

    assert sorted(outcomes) == ["unavailable", "up"]
    assert not breaker.is_open
    assert len(store_log(caplog, logging.WARNING)) == 1
    assert len(store_log(caplog, logging.INFO)) == 1
