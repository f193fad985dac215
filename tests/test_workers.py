"""Several worker processes share one port and serve the model their supervisor's control plane hands them.

The workers are told apart without a field in the contract: each builds its model at its own instant, so
`ModelInfo.loaded_at` differs between them, and fresh connections (a new channel with a private subchannel
pool, hence a new source port) are spread across the workers by the kernel.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from mlflow import MlflowClient

from streamflow.client.churn_client import ChurnClient
from streamflow.client.errors import ChurnServiceError
from streamflow.server.workers import CRASH_LIMIT, CRASH_WINDOW_S
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from streamflow.training.registry import promote
from tests.fixtures.processes import START_TIMEOUT_S, read_line

WORKERS = 2
DEADLINE_S = 120
"""Liveness bound of each wait below (model loads on a busy machine), not a performance expectation."""


def _model_info(port: int) -> pb.ModelInfoResponse | None:
    """ModelInfo over a brand-new connection; None while the worker reached has no model yet."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        try:
            reply: pb.ModelInfoResponse = pb_grpc.PredictionServiceStub(channel).ModelInfo(
                pb.ModelInfoRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE,):
                return None
            raise
        return reply


def _workers_on(port: int, version: str) -> set[str]:
    """Poll fresh connections until `WORKERS` distinct workers answer with `version`; their load instants."""
    seen: set[str] = set()
    deadline = time.monotonic() + DEADLINE_S
    while len(seen) < WORKERS:
        assert time.monotonic() < deadline, f"saw only {len(seen)} workers serving version {version}"
        info = _model_info(port)
        if info is not None and info.model.version == version:
            seen.add(info.loaded_at.ToJsonString())
    return seen


def _serve_env(settings: Settings, workers: int, port: int, **extra: str) -> dict[str, str]:
    """The environment of a `streamflow serve` child: only these STREAMFLOW_/MLFLOW_ variables."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STREAMFLOW_", "MLFLOW_"))},
        # Explicit: `mlflow.set_tracking_uri` in this process exports the session home's URI to children.
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "STREAMFLOW_HOME": str(settings.home),
        "STREAMFLOW_HOST": "127.0.0.1",
        "STREAMFLOW_PORT": str(port),
        "STREAMFLOW_WORKERS": str(workers),
        "STREAMFLOW_POLL_INTERVAL_S": "0.5",
        "STREAMFLOW_METRICS_PORT": "0",  # the default port would be shared by every test server at once
        "STREAMFLOW_HTTP_PORT": "0",  # likewise
        **extra,
    }


@contextlib.contextmanager
def _serving(
    settings: Settings,
    log_path: Path,
    workers: int = WORKERS,
    port: int = 0,
    announced: bool = True,
    **extra: str,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A `streamflow serve` process and the port it announced (0 without waiting for the announcement);
    SIGTERM and a bounded wait on exit."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "streamflow"), "serve"],
            env=_serve_env(settings, workers, port, **extra),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            yield process, _announced_port(process, log_path, workers) if announced else 0
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)


def _announced_port(process: subprocess.Popen[str], log_path: Path, workers: int) -> int:
    assert process.stdout is not None
    line = read_line(process.stdout, START_TIMEOUT_S)
    if workers > 1:
        match = re.search(r"listening on [\d.]+:(\d+) with (\d+) workers", line)
        assert match and int(match.group(2)) == workers, f"first line {line!r}; log: {log_path.read_text()}"
    else:
        match = re.search(r"listening on [\d.]+:(\d+)$", line.strip())
        assert match, f"unexpected first line {line!r}; log: {log_path.read_text()}"
    return int(match.group(1))


@pytest.fixture
def multi_worker_server(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    with _serving(fresh_embedded_settings, tmp_path / "serve.log") as served:
        yield served


def test_the_address_is_announced_once_every_worker_listens(
    multi_worker_server: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = multi_worker_server
    # Read at once after the announcement (the fixture returns on it): no wait, no retry.
    listening = _listeners(port)
    assert listening == {p.pid for p in psutil.Process(process.pid).children()}
    assert len(listening) == WORKERS


def test_every_worker_swaps_to_a_newly_promoted_version(
    multi_worker_server: tuple[subprocess.Popen[str], int], fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    process, port = multi_worker_server
    log_path = tmp_path / "serve.log"
    workers = psutil.Process(process.pid).children()
    assert len(workers) == WORKERS
    client = MlflowClient(
        tracking_uri=fresh_embedded_settings.tracking_uri, registry_uri=fresh_embedded_settings.tracking_uri
    )
    production = client.get_model_version_by_alias(fresh_embedded_settings.model_name, "production")
    first = _workers_on(port, str(production.version))

    # A new version of the same run (same features, same ONNX export), promoted while the workers serve.
    assert production.source
    candidate = client.create_model_version(
        fresh_embedded_settings.model_name, production.source, run_id=production.run_id, tags=production.tags
    )
    promote(fresh_embedded_settings, candidate.version, "Production", force=True)

    second = _workers_on(port, str(candidate.version))
    assert not first & second  # each worker built the new version's model itself
    assert [p.pid for p in psutil.Process(process.pid).children()] == [p.pid for p in workers]
    # The supervisor alone loaded and validated it, once, and switched both workers together.
    log = log_path.read_text()
    name = fresh_embedded_settings.model_name
    assert log.count(f"loading {name} version {candidate.version}") == 1, log
    switches = re.findall(
        rf"(\d) worker\(s\) serve {name} version {candidate.version} \(version skew ([\d.]+) ms\)", log
    )
    assert len(switches) == 1 and switches[0][0] == str(WORKERS), log

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


# --- one deployment per port --------------------------------------------------------------------------


def _free_port() -> int:
    # Released before use: a test starting a server on it may lose it to another process, never share it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listeners(port: int) -> set[int]:
    """Pids of the processes with a TCP socket listening on `port`."""
    return {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid is not None
    }


def _serving_processes(process: subprocess.Popen[str], workers: int) -> set[int]:
    """The processes that serve: the workers under a supervisor, or the one process itself."""
    if workers == 1:
        return {process.pid}
    return {p.pid for p in _live(psutil.Process(process.pid).children())}


def _live(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("first_workers", [WORKERS, 1], ids=["first-has-2-workers", "first-has-1-worker"])
def test_a_second_server_on_a_taken_port_exits_with_one_sentence(
    first_workers: int, embedded_settings: Settings, tmp_path: Path
) -> None:
    with _serving(embedded_settings, tmp_path / "first.log", workers=first_workers) as (first, port):
        version = _serving_version(port)
        serving = _serving_processes(first, first_workers)
        _eventually(lambda: _listeners(port) == serving, "the first server's listeners")

        second = subprocess.run(
            [str(Path(sys.executable).parent / "streamflow"), "serve"],
            env=_serve_env(embedded_settings, WORKERS, port),
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )

        assert second.returncode != 0
        assert second.stdout == ""
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"], second.stderr
        # The first server still holds the port alone, and every fresh connection reaches it.
        assert first.poll() is None
        assert _listeners(port) == serving
        for _ in range(20):
            info = _model_info(port)
            assert info is not None and info.model.version == version


def test_two_servers_starting_together_on_one_port_leave_one_serving(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    port = _free_port()
    command = [str(Path(sys.executable).parent / "streamflow"), "serve"]
    env = _serve_env(embedded_settings, WORKERS, port)
    logs = [(tmp_path / f"serve-{i}.log").open("w") for i in range(2)]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True) for log in logs
    ]
    try:
        lines = [read_line(p.stdout, START_TIMEOUT_S) if p.stdout else "" for p in processes]
        winners = [p for p, line in zip(processes, lines, strict=True) if "listening on" in line]
        losers = [p for p in processes if p not in winners]
        assert len(winners) == 1, lines
        assert losers[0].wait(timeout=DEADLINE_S) != 0
        for log in logs:
            log.flush()
        loser_log = (tmp_path / f"serve-{processes.index(losers[0])}.log").read_text()
        errors = [line for line in loser_log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, loser_log
        assert re.fullmatch(rf"error: cannot listen on 127\.0\.0\.1:{port}: .+", errors[0])
        assert winners[0].poll() is None
        _serving_version(port)
        _eventually(
            lambda: _listeners(port) == _serving_processes(winners[0], WORKERS), "the winner's listeners"
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
        for log in logs:
            log.close()


# --- supervision --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a ChurnClient loop saw: calls sent, calls failed, and how many ended with each status code."""

    sent: int = 0
    failed: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    failed_starts: list[float] = field(default_factory=list, repr=False)
    """Wall-clock instant each failed call was sent."""


@contextlib.contextmanager
def _churning(port: int, fresh_connections: bool = False) -> Iterator[Tally]:
    """A ChurnClient with default options calling Predict back to back on a thread while the block runs.

    With `fresh_connections` every call gets a client of its own on a new connection, which the kernel may
    hand to any worker listening, as a load balancer's new connections would be.
    """
    tally = Tally()
    stop = threading.Event()

    def call(client: ChurnClient) -> None:
        started = time.time()
        try:
            client.predict(FIRST_USER_ID)
            tally.codes["OK"] += 1
        except Exception as exc:  # counted, so the test fails on it instead of the thread dying
            tally.failed += 1
            tally.failed_starts.append(started)
            what = f"{exc.code.name} {exc.reason}" if isinstance(exc, ChurnServiceError) else repr(exc)
            tally.codes[what] += 1
        tally.sent += 1

    def loop() -> None:
        target = f"127.0.0.1:{port}"
        if fresh_connections:
            while not stop.is_set():
                with ChurnClient(target, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                    call(client)
        else:
            with ChurnClient(target) as client:
                while not stop.is_set():
                    call(client)

    thread = threading.Thread(target=loop, name="churn", daemon=True)
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join(timeout=DEADLINE_S)
        assert not thread.is_alive()


def _eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _serving_version(port: int) -> str:
    """The version a worker answers with once it has loaded its model."""
    deadline = time.monotonic() + DEADLINE_S
    while (info := _model_info(port)) is None:
        assert time.monotonic() < deadline, "no worker loaded a model"
        time.sleep(0.1)
    return str(info.model.version)


def _connected_worker(workers: list[psutil.Process], port: int) -> psutil.Process:
    """The one worker holding a client connection (the churn loop's single channel)."""

    def holders() -> list[psutil.Process]:
        return [
            w
            for w in workers
            if any(
                c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                for c in w.net_connections(kind="tcp")
            )
        ]

    _eventually(lambda: len(holders()) == 1, "exactly one worker holding the client's connection")
    return holders()[0]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "kill-TERM"])
def test_a_dead_worker_is_replaced_while_a_client_sees_no_failed_call(
    multi_worker_server: tuple[subprocess.Popen[str], int], signum: signal.Signals, tmp_path: Path
) -> None:
    process, port = multi_worker_server
    version = _serving_version(port)
    before = _workers_on(port, version)
    supervisor = psutil.Process(process.pid)
    workers = _live(supervisor.children())
    assert len(workers) == WORKERS

    with _churning(port) as tally:
        _eventually(lambda: tally.sent >= 200, "the client's first 200 calls")
        victim = _connected_worker(workers, port)
        with _churning(port, fresh_connections=True) as fresh:
            victim.send_signal(signum)

            def replacements() -> list[psutil.Process]:
                return [p for p in _live(supervisor.children()) if p.pid not in {w.pid for w in workers}]

            _eventually(lambda: len(replacements()) == 1 and not victim.is_running(), "a replacement worker")
            # Not `create_time()`: psutil derives it from the boot time in whole seconds, so it can read up to
            # a second early, before the victim's death window it is meant to close.
            replacement_seen = time.time()
            after = _workers_on(port, version)  # the replacement answers over fresh connections
            sent, fresh_sent = tally.sent, fresh.sent
            _eventually(lambda: tally.sent >= sent + 200 and fresh.sent >= fresh_sent + 20, "more calls")

    print(f"\n{signal.Signals(signum).name} of a worker: one connection {tally}; fresh connections {fresh}")
    assert tally.failed == 0, tally
    # A replacement binds the port only once its model is loaded, so no new connection finds it unready:
    # no call sent after it started fails. A connection being opened as the victim dies is reset by the
    # kernel (unless net.ipv4.tcp_migrate_req is 1) and a new channel then backs off before reconnecting, so
    # a call sent just then may fail UNAVAILABLE; that is the client's connect, not a worker's answer.
    assert all(started < replacement_seen for started in fresh.failed_starts), fresh
    if signum == signal.SIGKILL:
        assert set(fresh.codes) <= {"OK", "UNAVAILABLE "}, fresh
    else:
        # A draining worker listens for up to 2.2 s after SIGTERM (server/app.py DISPATCH_WAIT_MAX_S), and the
        # kernel keeps handing it its share of new connections meanwhile; those still in its accept queue
        # when it closes the port are reset, as for a kill. A call that lands in the instant grpc stops is
        # cancelled by grpc before the server sees it (about 1 in 2,500 on one connection): the client
        # retries that CANCELLED, so it never reaches the caller. Bounded so a real drain defect still fails.
        assert set(fresh.codes) <= {"OK", "UNAVAILABLE "}, fresh
        assert fresh.failed <= max(1, fresh.sent // 100), fresh
    assert len(after - before) == 1  # one worker kept its model, the other loaded it anew
    log = (tmp_path / "serve.log").read_text()
    death = "was killed by SIGKILL" if signum == signal.SIGKILL else "exited with code 0"
    assert len(re.findall(rf"worker \d \(process {victim.pid}\) {death}; restarting it in", log)) == 1, log
    assert log.count("restarting it in") == 1
    # Either stop signal drains every worker; workers exiting then are not restarted.
    survivors = _live(supervisor.children())
    process.send_signal(signal.SIGINT if signum == signal.SIGTERM else signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not _live(survivors)
    log = (tmp_path / "serve.log").read_text()
    assert log.count("restarting it in") == 1 and log.count("restarted as process") == 1


def test_a_worker_that_keeps_dying_stops_the_server_with_one_error_line(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    killed: set[int] = set()
    with _serving(embedded_settings, log_path, announced=False) as (process, _):
        supervisor = psutil.Process(process.pid)

        def kill_every_worker() -> bool:  # as an OOM killer would, each time one starts
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in supervisor.children():
                    if child.pid not in killed:
                        killed.add(child.pid)
                        child.kill()
            return process.poll() is not None

        _eventually(kill_every_worker, "the supervisor to give up")

    assert process.returncode != 0
    log = log_path.read_text()
    errors = [line for line in log.splitlines() if "stopping the server" in line]
    assert len(errors) == 1, log
    assert re.search(
        rf"ERROR streamflow\.server\.workers: worker \d died {CRASH_LIMIT} times within "
        rf"{CRASH_WINDOW_S:.0f} s \(last: process \d+ was killed by SIGKILL\); stopping the server$",
        errors[0],
    )
    assert log.count("restarting it in") >= CRASH_LIMIT - 1
    dead = {int(pid) for pid in re.findall(r"\(process (\d+)\) was killed by SIGKILL", log)}
    assert len(dead) >= CRASH_LIMIT and dead <= killed, log
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).ppid() == process.pid for pid in dead)


def test_a_registry_the_server_cannot_open_is_one_error_line_before_any_worker_starts(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    # MLflow knows no `htp` scheme. Only the supervisor opens the registry, so it fails once, at start.
    with _serving(
        embedded_settings, log_path, announced=False, MLFLOW_TRACKING_URI="htp://127.0.0.1:5000"
    ) as (process, _):
        assert process.wait(timeout=DEADLINE_S) == 1
        assert process.stdout is not None
        assert process.stdout.read() == ""

    log = log_path.read_text()
    assert log.startswith("error: cannot open the MLflow registry at htp://127.0.0.1:5000: "), log
    assert len(log.strip().splitlines()) == 1, log
    assert "Traceback" not in log and "worker" not in log


def test_workers_stop_when_the_supervisor_is_killed(
    multi_worker_server: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = multi_worker_server
    _serving_version(port)
    workers = _live(psutil.Process(process.pid).children())
    assert len(workers) == WORKERS

    process.kill()
    process.wait(timeout=60)

    # Each orphan is sent SIGTERM by the kernel, drains and exits: no worker serves unsupervised.
    _eventually(lambda: not _live(workers), "the orphaned workers to exit")
    assert not _listeners(port)
