"""`streamflow serve` as a process: SIGTERM drains calls in flight and exits 0; start-up errors are clear."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.errors import StreamflowError
from streamflow.server.app import PredictionServer, create_server
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.processes import START_TIMEOUT_S, read_line
from tests.fixtures.serving import server_settings

STREAMFLOW = Path(sys.executable).parent / "streamflow"
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def serve_env(settings: Settings, **values: str) -> dict[str, str]:
    """The environment of a `streamflow serve` process for the embedded home of `settings`, nothing inherited
    from the shell's own STREAMFLOW_* or MLFLOW_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMFLOW_", "MLFLOW_"))}
    env.update(
        STREAMFLOW_HOME=str(settings.home),
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_WORKERS="1",
        STREAMFLOW_POLL_INTERVAL_S="0.25",
        STREAMFLOW_METRICS_PORT="0",  # the default port would be shared by every test server at once
        STREAMFLOW_HTTP_PORT="0",  # likewise
        **values,
    )
    return env


@pytest.fixture
def serve_process(embedded_settings: Settings) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A `streamflow serve` process on a free port, and its address once it is SERVING."""
    process = subprocess.Popen(
        [str(STREAMFLOW), "serve"],
        env=serve_env(embedded_settings, STREAMFLOW_GRACE_S="60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        match = LISTENING.search(read_line(process.stdout, START_TIMEOUT_S))
        assert match, "streamflow serve did not announce its address"
        address = f"127.0.0.1:{match.group(1)}"
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=120
            )
            for update in watch:
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    watch.cancel()
                    break
        yield process, address
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_sigterm_drains_calls_in_flight_then_exits_zero(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    process, address = serve_process
    request = pb.BatchPredictRequest(user_ids=[FIRST_USER_ID] * 1000)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        calls = [stub.BatchPredict.future(request) for _ in range(8)]
        # The asyncio server starts a handler for each call as it arrives, and the batch pool (2 threads)
        # takes them in order: once the first batch is answered, the others are in the application, most
        # of them still waiting for a thread, so several are in flight when the signal lands.
        calls[0].result()
        unfinished_at_signal = sum(not call.done() for call in calls)
        process.send_signal(signal.SIGTERM)
        shutdown_status = next(watch).status
        watch.cancel()  # else the server would wait its whole grace period for this open stream
        results = [call.result() for call in calls]
        exit_code = process.wait(timeout=120)
        with pytest.raises(grpc.RpcError) as after_exit:
            stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=10)

    assert unfinished_at_signal > 0, "every batch finished before SIGTERM; the drain was not exercised"
    assert shutdown_status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [len(r.results) for r in results] == [1000] * len(calls)
    assert all(r.results[0].HasField("prediction") for r in results)
    assert exit_code == 0
    assert after_exit.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_storm_of_signals_still_drains_and_exits_zero(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    """A worker often gets two SIGTERMs at once (its process group's and its supervisor's): each signal the
    handler takes must leave the stop able to finish, whenever it lands."""
    process, _ = serve_process
    for _ in range(2000):
        process.send_signal(signal.SIGTERM if _ % 2 else signal.SIGINT)
    assert process.wait(timeout=120) == 0


def test_a_malformed_model_uri_stops_serve_with_one_sentence(embedded_settings: Settings) -> None:
    result = subprocess.run(
        [str(STREAMFLOW), "serve"],
        env=serve_env(embedded_settings, STREAMFLOW_MODEL_URI="streamflow_churn:latest"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model URI 'streamflow_churn:latest' is not of the form models:/<name>/<Stage>, "
        "models:/<name>@<alias> or models:/<name>/<version>"
    )


def test_a_port_in_use_is_an_error_not_a_shared_port(
    embedded_settings: Settings, embedded_server: PredictionServer
) -> None:
    with pytest.raises(StreamflowError) as refused:
        create_server(server_settings(embedded_settings, port=embedded_server.port))

    assert str(refused.value) == (
        f"cannot listen on 127.0.0.1:{embedded_server.port}: the port is in use or the address is not local"
    )
