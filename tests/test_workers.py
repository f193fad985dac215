"""Several worker processes share one port, and each follows the registry on its own.

The workers are told apart without a field in the contract: each loads its model at its own instant, so
`ModelInfo.loaded_at` differs between them, and fresh connections (a new channel with a private subchannel
pool, hence a new source port) are spread across the workers by the kernel.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from mlflow import MlflowClient

from client.generated.streamflow.serving.v1 import prediction_service_pb2 as pb
from client.generated.streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from training.registry import promote

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


@pytest.fixture
def multi_worker_server(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STREAMFLOW_", "MLFLOW_"))},
        # Explicit: `mlflow.set_tracking_uri` in this process exports the session home's URI to children.
        "MLFLOW_TRACKING_URI": fresh_embedded_settings.tracking_uri,
        "STREAMFLOW_HOME": str(fresh_embedded_settings.home),
        "STREAMFLOW_HOST": "127.0.0.1",
        "STREAMFLOW_PORT": "0",
        "STREAMFLOW_WORKERS": str(WORKERS),
        "STREAMFLOW_POLL_INTERVAL_S": "0.5",
    }
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "streamflow"), "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on [\d.]+:(\d+) with (\d+) workers", line)
        assert match, f"unexpected first line {line!r}; log: {(tmp_path / 'serve.log').read_text()}"
        assert int(match.group(2)) == WORKERS
        yield process, int(match.group(1))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        log.close()


def test_every_worker_swaps_to_a_newly_promoted_version(
    multi_worker_server: tuple[subprocess.Popen[str], int], fresh_embedded_settings: Settings
) -> None:
    process, port = multi_worker_server
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
    assert not first & second  # each worker loaded the new version itself
    assert [p.pid for p in psutil.Process(process.pid).children()] == [p.pid for p in workers]

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
