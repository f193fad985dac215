"""Version skew: how far apart in time the workers of one server switch to a newly promoted version; part of
`make bench` (`--skew-only` alone, under a minute).

The same `streamflow serve` (its default worker count) follows the bench home's registry while versions are
promoted one after another: each a new registry version of the served run (same model, same features), so a
switch costs what a real promotion costs. The supervisor's control plane loads and validates each version
once, has every worker build it, then swaps them all on one message, and logs the spread of the workers' swap
instants (CLOCK_MONOTONIC, one clock for every process). The target (issue 13) is under 50 ms. The versions
made here are deleted and the original Production version restored afterwards: the bench home stays as it was.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from statistics import median

import mlflow
from mlflow import MlflowClient

from bench.services import BIN, free_port, grpc_serving, start
from streamflow.settings import Settings
from streamflow.training.registry import promote

SWITCHES = 5
SWITCH_TIMEOUT_S = 120.0
"""Liveness bound of one switch (the poll interval, then a model load), not a figure."""


def measure_skew(env: dict[str, str], settings: Settings, log: Path, switches: int = SWITCHES) -> str:
    """Promote `switches` versions in turn under a running server; the markdown lines of the figures."""
    # MLflow resolves a `models:/` source of a new version against its process-wide tracking URI.
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    name = settings.model_name
    production = client.get_model_version_by_alias(name, "production")
    assert production.source
    port = free_port()
    service = start(
        "StreamFlow gRPC",
        [str(BIN / "streamflow"), "serve"],
        {
            **env,
            "STREAMFLOW_HOST": "127.0.0.1",
            "STREAMFLOW_PORT": str(port),
            "STREAMFLOW_POLL_INTERVAL_S": "1",
        },
        grpc_serving,
        port,
        log,
    )
    made: list[str] = []
    skews: list[float] = []
    workers = 0
    try:
        for number in range(switches):
            print(f"  version skew, switch {number + 1} of {switches}", flush=True)
            candidate = client.create_model_version(
                name, production.source, run_id=production.run_id, tags=production.tags
            )
            made.append(str(candidate.version))
            promote(settings, candidate.version, "Production", force=True)
            pattern = re.compile(
                rf"(\d+) worker\(s\) serve {re.escape(name)} version {candidate.version} "
                rf"\(version skew ([\d.]+) ms\)"
            )
            deadline = time.monotonic() + SWITCH_TIMEOUT_S
            while not (found := pattern.search(log.read_text(errors="replace"))):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no switch to version {candidate.version} within {SWITCH_TIMEOUT_S:g} s"
                    )
                time.sleep(0.2)
            workers = int(found.group(1))
            skews.append(float(found.group(2)))
    finally:
        service.stop()
        promote(settings, production.version, "Production", force=True)
        for version in made:
            client.delete_model_version(name, version)
    return "\n".join(
        [
            "",
            f"Version skew ({switches} promotions under a running server of {workers} workers; the spread of "
            "the workers' swap instants, target under 50 ms): "
            f"median {median(skews):.2f} ms, worst {max(skews):.2f} ms.",
            "",
        ]
    )
