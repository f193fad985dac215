"""One control plane, lean workers: the supervisor alone follows the registry and hands its workers a
self-contained scoring artifact; a worker holds none of the control plane's libraries.

The switch of versions across workers, and the one load per version, are checked on a real multi-worker
server in tests/test_workers.py; here, what a worker imports and the worker's side of the control channel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient

from streamflow.client.churn_client import ChurnClient
from streamflow.client.errors import ServiceUnavailableError
from streamflow.client.results import Prediction
from streamflow.feature_repo.store import open_store
from streamflow.server.domain import Runtime
from streamflow.server.model_follower import ModelFollower, receive, send
from streamflow.server.model_loader import load_model
from streamflow.server.scoring_artifact import ScoringArtifact
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.metrics import free_port
from tests.fixtures.processes import serve_env, serving_process

CONTROL_PLANE_LIBRARIES = ("feast", "mlflow", "pandas", "sklearn", "pyarrow", "scipy")
"""What only the control plane needs. Each ships compiled extensions (feast and mlflow through pyarrow and
pandas, which both import), so a process that imported one maps its shared objects."""


def _mapped_libraries(pid: int) -> set[str]:
    """The site-packages distributions whose shared objects process `pid` has mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return set(re.findall(r"/site-packages/([A-Za-z0-9_]+)/", maps))


@pytest.fixture
def two_workers(embedded_settings: Settings, tmp_path: Path) -> Iterator[tuple[psutil.Process, str]]:
    env = serve_env(
        STREAMFLOW_HOME=str(embedded_settings.home),
        MLFLOW_TRACKING_URI=embedded_settings.tracking_uri,
        STREAMFLOW_WORKERS="2",
        STREAMFLOW_PORT="0",
    )
    with serving_process(env, tmp_path / "serve.log") as (process, address):
        yield psutil.Process(process.pid), address


def _health(port: int) -> str:
    """The server's health on a fresh connection, as a probe asks it; the status name or the error code."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_scoring_worker_maps_none_of_the_control_planes_libraries(
    two_workers: tuple[psutil.Process, str], served_embedded: str
) -> None:
    supervisor, address = two_workers
    # Served first, on fresh connections until both workers answered, so each has built its model, read
    # features and explained a prediction (from the explainer arrays it maps from the artifact): whatever
    # scoring imports is in.
    with ChurnClient(served_embedded) as single_process:
        explained = single_process.predict(FIRST_USER_ID, explain=True)
    answered: dict[str, Prediction] = {}
    deadline = time.monotonic() + 120
    while len(answered) < 2:
        assert time.monotonic() < deadline, f"only {len(answered)} worker(s) answered"
        fresh = ChurnClient(address, options=[("grpc.use_local_subchannel_pool", 1)])
        with fresh as client, contextlib.suppress(ServiceUnavailableError):
            prediction = client.predict(FIRST_USER_ID, explain=True)
            answered[str(client.model_info().loaded_at)] = prediction
    workers = supervisor.children()
    assert len(workers) == 2

    for worker in workers:
        assert _mapped_libraries(worker.pid) & set(CONTROL_PLANE_LIBRARIES) == set(), worker.pid
        assert {"onnxruntime", "numpy", "grpc"} <= _mapped_libraries(worker.pid)
        assert "_treeshap" in Path(f"/proc/{worker.pid}/maps").read_text()
    # Workers explain exactly as the single-process server, which explains from the arrays in memory.
    assert all(prediction == explained for prediction in answered.values())
    # The check can fail: the supervisor, which follows the registry, maps them.
    assert {"pyarrow", "pandas"} <= _mapped_libraries(supervisor.pid)


def test_the_worker_side_of_the_control_channel(embedded_settings: Settings, tmp_path: Path) -> None:
    settings = embedded_settings
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    version = client.get_model_version_by_alias(settings.model_name, "production")
    artifact, _ = load_model(settings, client, open_store(settings), version)
    written = artifact.write(tmp_path / "artifact")
    read = ScoringArtifact.read(written)  # what the worker reads is what was validated
    # The forest runtime's model is the explainer's arrays: no model file of its own.
    assert read.runtime is Runtime.FOREST and read == artifact
    assert sorted(p.name for p in written.iterdir()) == ["artifact.json", "explainer"]
    onnx_settings = settings.model_copy(update={"runtime": "onnx"})
    onnx, _ = load_model(onnx_settings, client, open_store(settings), version)
    read_onnx = ScoringArtifact.read(onnx.write(tmp_path / "onnx-artifact"))
    assert isinstance(read_onnx.model, Path) and read_onnx.model.read_bytes() == onnx.model
    assert dataclasses.replace(read_onnx, model=onnx.model) == onnx

    supervisor, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    follower = ModelFollower(settings, worker)
    follower.start()
    try:
        # An artifact that cannot be read is refused, and nothing serves yet.
        send(supervisor, {"op": "prepare", "seq": 1, "artifact": str(tmp_path / "missing")})
        refused = receive(supervisor)
        assert refused is not None
        assert (refused["op"], refused["seq"]) == ("unusable", 1)
        assert refused["error"].startswith("FileNotFoundError: ")
        send(supervisor, {"op": "serve", "seq": 1, "stage": "Production", "aliases": [], "failure": None})

        send(supervisor, {"op": "prepare", "seq": 2, "artifact": str(written)})
        assert receive(supervisor) == {"op": "prepared", "seq": 2}
        assert follower.current is None  # prepared beside, not served until told
        failure = {"version": "9", "reason": "it has no as_of tag", "at": "2026-12-01T00:00:00+00:00"}
        send(supervisor, {"op": "serve", "seq": 2, "stage": "Staging", "aliases": ["x"], "failure": failure})
        swapped = receive(supervisor)
        assert swapped is not None
        assert (swapped["op"], swapped["seq"]) == ("serving", 2)
        assert follower.wait_until_serving(timeout_s=10)
        current = follower.current
        assert current is not None
        assert (current.ref, current.stage, current.aliases) == (artifact.ref, "Staging", ("x",))
        assert follower.last_failure is not None and follower.last_failure.model_version == "9"
        (row,) = current.reader.read([FIRST_USER_ID])
        assert current.model.predict_proba(current.reader.columns([row])).shape == (1, 2)

        # A state change of the model serving swaps nothing and asks for no answer.
        send(supervisor, {"op": "serve", "seq": 2, "stage": "Production", "aliases": [], "failure": None})
        send(supervisor, {"op": "prepare", "seq": 3, "artifact": str(tmp_path / "missing")})
        later = receive(supervisor)
        assert later is not None and (later["op"], later["seq"]) == ("unusable", 3)
        assert follower.current is not None and follower.current.stage == "Production"
        assert follower.current.model is current.model
    finally:
        follower.stop()
        supervisor.close()
    assert not follower.alive


def test_the_supervisor_answers_the_health_port_off_the_workers(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    health_port = free_port()
    env = serve_env(
        STREAMFLOW_HOME=str(embedded_settings.home),
        MLFLOW_TRACKING_URI=embedded_settings.tracking_uri,
        STREAMFLOW_WORKERS="2",
        STREAMFLOW_PORT="0",
        STREAMFLOW_HEALTH_PORT=str(health_port),
        STREAMFLOW_DRAIN_DELAY_S="3",  # load balancers get 3 s to see NOT_SERVING before calls are refused
    )
    log = tmp_path / "serve.log"
    with serving_process(env, log) as (process, _):
        deadline = time.monotonic() + 120
        while (status := _health(health_port)) != "SERVING":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        supervisor = psutil.Process(process.pid)
        listening = {
            c.pid
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == health_port and c.status == psutil.CONN_LISTEN
        }
        assert listening == {supervisor.pid}
        # One worker killed: the other still serves, and so does the server's health.
        victim = supervisor.children()[0]
        victim.kill()
        victim.wait(10)
        assert _health(health_port) == "SERVING"

        # Within the 3 s of drain delay, while the workers still answer calls, probes read NOT_SERVING.
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2.5
        while (draining := _health(health_port)) == "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        process.wait(60)

    assert draining == "NOT_SERVING"
    assert f"health, plaintext, on 127.0.0.1:{health_port}, answered by the supervisor" in log.read_text()


def test_two_watchers_loading_at_once_both_load(embedded_settings: Settings) -> None:
    """The production and the shadow watcher load on threads of their own, often at once (at start-up).

    Python 3.11's AST builder keeps its recursion depth per interpreter, not per thread (CPython gh-106905),
    and numpy reads every array header with `ast.literal_eval`: two loads interleaved inside it fail with a
    spurious SystemError, which refused a shadow for five minutes in CI. A switch interval of a microsecond
    makes the interleaving all but certain without the control plane's loading lock."""
    settings = embedded_settings
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    version = client.get_model_version_by_alias(settings.model_name, "production")
    store = open_store(settings)
    results: list[ScoringArtifact | BaseException] = []

    def load() -> None:
        try:
            results.append(load_model(settings, client, store, version)[0])
        except BaseException as exc:
            results.append(exc)

    loading = [threading.Thread(target=load) for _ in range(2)]
    litter = threading.Thread(target=_litter, args=(loading,))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in [*loading, litter]:
            thread.start()
        for thread in [*loading, litter]:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert [result for result in results if not isinstance(result, ScoringArtifact)] == []
    assert len(results) == 2
    assert results[0] == results[1]


class _Cycle:
    """Garbage only the cycle collector frees, whose finalizer runs Python code: a collection that starts
    inside the AST builder then hands the interpreter to another thread there, as the control plane's own
    garbage (generators, sockets, temporary files) does."""

    def __init__(self) -> None:
        self.itself = self

    def __del__(self) -> None:
        sum(range(100))


def _litter(threads: list[threading.Thread]) -> None:
    while any(thread.is_alive() for thread in threads):
        _Cycle()
