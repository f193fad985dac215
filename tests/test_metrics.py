"""Prometheus metrics of a real `streamflow serve`: one endpoint adds up every worker, exactly.

Each call goes over a brand-new connection, so the kernel spreads them over the workers; the scrape is parsed
with prometheus_client's own text parser, and every count is compared with the calls the test made."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.mmap_dict import MmapedDict

from bench import inside
from streamflow.feature_repo.definitions import VIEW_SPECS
from streamflow.server.errors import FeatureStoreUnavailable
from streamflow.server.metrics import (
    BULK_OBSERVE_MIN,
    CHURN_PROBABILITY,
    MetricsEndpoint,
    _remove_orphaned_dirs,
    observe_all,
)
from streamflow.server.store_health import StoreBreaker
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.metrics import (
    Scrape,
    call,
    eventually,
    free_port,
    live_models,
    loaded_at,
    metrics_server,
    scrape,
    scrapes,
)
from tests.fixtures.processes import serve_env, serving_process
from tests.fixtures.serving import departed_users, write_user_features
from tests.test_server_registry import (
    move_straight_to_production,
    register_copy,
    register_copy_without_metrics,
)

SERVICE = "streamflow.serving.v1.PredictionService"
OK, NOT_FOUND, INVALID = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


def handled(scraped: Scrape, method: str, code: str) -> float:
    return scraped.value(
        "grpc_server_handled_total",
        grpc_service=SERVICE,
        grpc_method=method,
        grpc_code=code,
        grpc_type="unary",
    )


def started(scraped: Scrape, method: str) -> float:
    return scraped.value("grpc_server_started_total", grpc_service=SERVICE, grpc_method=method)


def handling_count(scraped: Scrape, method: str) -> float:
    return scraped.value("grpc_server_handling_seconds_count", grpc_service=SERVICE, grpc_method=method)


def grpc_counts(scraped: Scrape) -> dict[str, float]:
    """Every gRPC counter and histogram count of the scrape, by sample."""
    names = ("grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds_count")
    return {f"{n}{sorted(ls)}": v for (n, ls), v in scraped.samples.items() if n in names}


def test_counts_from_every_worker_add_up_and_survive_a_worker_restart(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    with metrics_server(fresh_embedded_settings, tmp_path / "serve.log") as served:
        before = served.scrape()
        sums_before = inside.read(served.metrics_port)  # the benchmark's reading of the same histograms
        # ModelInfo answers tell the workers apart: the calls below did reach both. The kernel spreads new
        # connections by a hash, so a few more calls are made when the first 20 happened to miss one.
        workers_seen: set[str] = set()
        model_infos = 0
        while model_infos < 20 or (len(workers_seen) < 2 and model_infos < 60):
            workers_seen.add(loaded_at(served.address))
            model_infos += 1
        assert len(workers_seen) == 2, served.log.read_text()[-4000:]
        predict = [
            call(served.address, "Predict", pb.PredictRequest(user_id=FIRST_USER_ID)) for _ in range(30)
        ]
        unknown = [
            call(served.address, "Predict", pb.PredictRequest(user_id="nobody-here")) for _ in range(10)
        ]
        malformed = [
            call(served.address, "Predict", pb.PredictRequest(user_id="no spaces")) for _ in range(5)
        ]
        batch = pb.BatchPredictRequest(user_ids=[FIRST_USER_ID, "nobody-here", FIRST_USER_ID])
        batches = [call(served.address, "BatchPredict", batch) for _ in range(6)]
        assert (predict, unknown, malformed, batches) == (
            [OK] * 30,
            [NOT_FOUND] * 10,
            [INVALID] * 5,
            [OK] * 6,
        )

        after = served.scrape()
        sums_after = inside.read(served.metrics_port)
        assert handled(after, "ModelInfo", "OK") - handled(before, "ModelInfo", "OK") == model_infos
        assert handled(after, "Predict", "OK") - handled(before, "Predict", "OK") == 30
        assert handled(after, "Predict", "NOT_FOUND") - handled(before, "Predict", "NOT_FOUND") == 10
        assert (
            handled(after, "Predict", "INVALID_ARGUMENT") - handled(before, "Predict", "INVALID_ARGUMENT")
            == 5
        )
        assert handled(after, "BatchPredict", "OK") - handled(before, "BatchPredict", "OK") == 6
        for method, calls in (("Predict", 45), ("BatchPredict", 6), ("ModelInfo", model_infos)):
            assert started(after, method) - started(before, method) == calls
            assert handling_count(after, method) - handling_count(before, method) == calls
        assert after.value("streamflow_calls_in_flight", grpc_service=SERVICE) == 0

        # The domain: 30 + 12 users scored; 10 + 6 unknown; Predicts coalesce into batches of 40 users in all.
        delta = {name: after.value(name) - before.value(name) for name in _DOMAIN_SAMPLES}
        assert delta["streamflow_predictions_total"] == 42
        assert delta["streamflow_churn_probability_count"] == 42

        def grew(name: str, **labels: str) -> float:
            return after.value(name, **labels) - before.value(name, **labels)

        assert grew("streamflow_feature_problems_total", reason="unknown_user") == 16
        assert grew("streamflow_batch_size_sum", kind="predict") == 40
        assert grew("streamflow_batch_size_count", kind="batch_predict") == 6
        assert grew("streamflow_batch_size_sum", kind="batch_predict") == 18
        assert delta["streamflow_feature_read_seconds_count"] >= 1  # one per scoring call, coalesced or not
        assert delta["streamflow_inference_seconds_count"] >= 1
        assert after.value("streamflow_model_reloads_total", outcome="loaded") == 1  # the control plane, once

        # The benchmark's means read the same calls: all 45 Predicts, a scoring per coalesced batch.
        key = (inside.HANDLING, "Predict")
        assert sums_after[key][1] - sums_before.get(key, (0.0, 0.0))[1] == 45
        assert (inside.mean_ms(sums_before, sums_after, inside.HANDLING, "Predict") or 0) > 0
        for histogram in inside.PARTS.values():
            assert (inside.mean_ms(sums_before, sums_after, histogram) or 0) > 0
        assert inside.mean_ms(sums_before, sums_after, inside.HANDLING, "Watch") is None  # no such call

        # A worker killed: its counts stay in the sums, its model-info series goes, the restart is counted.
        victim = next(iter(live_models(after)))
        os.kill(int(victim), signal.SIGKILL)
        eventually(
            lambda: victim not in live_models(served.scrape()) and len(live_models(served.scrape())) == 2,
            "the replacement worker reports its model and the dead one's series is gone",
        )
        restarted = served.scrape()
        assert restarted.value("streamflow_worker_restarts_total") == 1
        assert grpc_counts(restarted) == grpc_counts(after)  # no call was made meanwhile, none was lost
        assert restarted.value("streamflow_predictions_total") == after.value("streamflow_predictions_total")
        # The replacement built the control plane's artifact: nothing was loaded from the registry again.
        assert restarted.value("streamflow_model_reloads_total", outcome="loaded") == 1

        more = [call(served.address, "Predict", pb.PredictRequest(user_id=FIRST_USER_ID)) for _ in range(20)]
        assert more == [OK] * 20
        final = served.scrape()
        assert handled(final, "Predict", "OK") - handled(before, "Predict", "OK") == 50
        assert (
            final.value("streamflow_predictions_total") - before.value("streamflow_predictions_total") == 62
        )


_DOMAIN_SAMPLES = (
    "streamflow_predictions_total",
    "streamflow_churn_probability_count",
    "streamflow_feature_read_seconds_count",
    "streamflow_inference_seconds_count",
)


def test_one_worker_serves_its_own_metrics_with_every_feature_reason_and_reload_outcome(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = fresh_embedded_settings
    write_user_features(settings, "half-user", views=[VIEW_SPECS[0].name])
    write_user_features(settings, "negative-fee", monthly_fee=-5.0)
    stale = departed_users(settings)[0]
    with metrics_server(settings, tmp_path / "serve.log", workers=1) as served:
        before = served.scrape()
        assert [pid for pid in live_models(before)] == [str(served.process.pid)]  # no supervisor: itself
        codes = [
            call(served.address, "Predict", pb.PredictRequest(user_id=user))
            for user in ("half-user", "negative-fee", stale, "nobody-here")
        ]
        assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 3 + [NOT_FOUND]
        after = served.scrape()
        for reason in ("missing", "invalid", "stale", "unknown_user"):
            assert (
                after.value("streamflow_feature_problems_total", reason=reason)
                - before.value("streamflow_feature_problems_total", reason=reason)
                == 1
            ), reason
        assert after.value("streamflow_predictions_total") == before.value("streamflow_predictions_total")

        # A good version loaded, then a bad one refused: counted by outcome; model info follows the swap.
        good = register_copy(settings)
        move_straight_to_production(settings, good)
        eventually(lambda: set(live_models(served.scrape()).values()) == {good}, f"version {good} served")
        swapped = served.scrape()
        assert swapped.value("streamflow_model_reloads_total", outcome="loaded") == 2
        info = {
            (dict(ls)["model_version"], dict(ls)["stage"]): value
            for ls, value in swapped.series("streamflow_model_info").items()
        }
        assert info == {("1", "Production"): 0.0, (good, "Production"): 1.0}
        bad = register_copy_without_metrics(settings)
        move_straight_to_production(settings, bad)
        eventually(
            lambda: served.scrape().value("streamflow_model_reloads_total", outcome="refused") == 1,
            "the refusal is counted",
        )
        assert set(live_models(served.scrape()).values()) == {good}


def test_observing_a_batch_at_once_equals_observing_each_value() -> None:
    bounds = CHURN_PROBABILITY._upper_bounds[:-1]  # the finite ones; +Inf is implied
    # On each bound, between them, below the first, above the last, repeated: counted with numpy, and (fewer
    # than BULK_OBSERVE_MIN) one at a time; a large batch; a batch of one.
    edges = np.array([0.0, 0.1, 0.15, 0.5, 0.5, 0.999, 1.0, 3.5])
    batches = [np.tile(edges, BULK_OBSERVE_MIN), edges, np.linspace(0, 1, 1000), np.array([0.05])]
    registry = CollectorRegistry()
    one_by_one = Histogram("one_by_one", "", buckets=bounds, registry=registry)
    at_once = Histogram("at_once", "", buckets=bounds, registry=registry)

    for values in batches:
        for value in values:
            one_by_one.observe(float(value))
        observe_all(at_once, values)

    def samples(name: str) -> list[tuple[str, dict[str, str], float]]:
        return [
            (sample.name.removeprefix(name), sample.labels, sample.value)
            for metric in registry.collect()
            if metric.name == name
            for sample in metric.samples
            if not sample.name.endswith("_created")
        ]

    expected, actual = samples("one_by_one"), samples("at_once")
    assert [(suffix, labels) for suffix, labels, _ in actual] == [(s, ls) for s, ls, _ in expected]
    assert [value for _, _, value in actual] == pytest.approx([value for _, _, value in expected])
    assert (
        dict((suffix, value) for suffix, _, value in actual)["_count"]
        == (BULK_OBSERVE_MIN + 1) * len(edges) + 1001
    )


def test_store_errors_count_every_failed_read() -> None:
    """A real Redis client against a port nothing listens on: the read that finds the store down and the
    reads refused at once while the breaker is open each count once (in this process's own registry)."""
    port = free_port()
    client = redis.Redis(port=port, socket_connect_timeout=1)
    breaker = StoreBreaker("redis-metrics-test", (redis.exceptions.ConnectionError,), probe_interval_s=3600)
    labels = {"store": "redis-metrics-test"}
    before = REGISTRY.get_sample_value("streamflow_online_store_errors_total", labels) or 0.0
    for _ in range(3):
        with pytest.raises(FeatureStoreUnavailable):
            breaker.call(lambda: client.get("x"))
    assert REGISTRY.get_sample_value("streamflow_online_store_errors_total", labels) == before + 3


def test_the_endpoint_is_started_again_when_its_thread_dies_or_its_port_frees(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamflow.server.metrics")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = MetricsEndpoint("127.0.0.1", port, str(tmp_path))
        for _ in range(3):
            endpoint.check()
        assert not endpoint.serving
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"cannot serve metrics on 127.0.0.1:{port} (Address already in use); trying again"
    ]
    try:
        endpoint.check()  # the port is free now
        assert endpoint.serving and scrapes(port)
        assert "metrics endpoint serving again" in caplog.records[-1].getMessage()

        # The serving thread ends (its loop stopped from outside, as an unexpected exit would): noticed,
        # logged once, started again on the same port.
        server = endpoint._server
        assert server is not None
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        stopper.join(timeout=30)
        eventually(lambda: not endpoint.serving, "the thread ends")
        endpoint.check()
        assert endpoint.serving and scrapes(port)
        assert "stopped; starting it again" in caplog.text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
        assert scrape(port).families == set()  # an empty folder: nothing written yet
    finally:
        endpoint.close()


def test_a_scrape_that_meets_a_worker_creating_its_file_still_answers(tmp_path: Path) -> None:
    # A worker's file exists empty for a moment before prometheus_client sizes it; the scrape answered 500.
    written = MmapedDict(str(tmp_path / "counter_101.db"))
    written.write_value(json.dumps(["streamflow_demo", "streamflow_demo_total", {}, "demo"]), 3.0, 0.0)
    written.close()
    (tmp_path / "counter_102.db").touch()
    endpoint = MetricsEndpoint("127.0.0.1", free_port(), str(tmp_path))
    endpoint.check()
    try:
        assert scrape(endpoint.port).value("streamflow_demo_total") == 3.0
    finally:
        endpoint.close()


def test_metrics_port_0_opens_no_port_but_grpc(fresh_embedded_settings: Settings, tmp_path: Path) -> None:
    env = serve_env(
        MLFLOW_TRACKING_URI=fresh_embedded_settings.tracking_uri,
        STREAMFLOW_HOME=str(fresh_embedded_settings.home),
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_METRICS_PORT="0",
    )
    with serving_process(env, tmp_path / "serve.log") as (process, address):
        eventually(lambda: call(address, "ModelInfo", pb.ModelInfoRequest()) == OK, "a model is served")
        listening = {
            c.laddr.port
            for c in psutil.Process(process.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {int(address.rsplit(":", 1)[1])}


def test_folders_of_killed_servers_are_removed_and_live_ones_kept() -> None:
    """A server killed with SIGKILL cannot remove its folder; the next server start does."""
    exited = subprocess.Popen(["true"])
    exited.wait()  # reaped: its pid names no process now
    orphan = Path(tempfile.mkdtemp(prefix=f"streamflow-metrics-{exited.pid}-"))
    (orphan / "counter_1.db").write_bytes(b"")
    live = Path(tempfile.mkdtemp(prefix=f"streamflow-metrics-{os.getpid()}-"))
    try:
        _remove_orphaned_dirs()
        assert not orphan.exists()
        assert live.exists()
    finally:
        shutil.rmtree(orphan, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
