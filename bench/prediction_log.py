"""What the prediction log costs a Predict; part of `make bench` (alone: `python -m bench.run --log-only`).

The same `streamflow serve` (its default workers) with `STREAMFLOW_PREDICTION_LOG` off and on, started in
turn round after round so the machine's drift falls on both alike. h2load drives Predict: p50 at concurrency
1 and calls/s at concurrency 32 (issue 15's budget: the log costs at most 10% of it). After each logged run
the server is stopped with SIGTERM and the rows of its Parquet files are counted against the calls it
answered, so the table also shows that nothing was dropped.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import pyarrow.parquet as pq

from bench import h2load
from bench.services import alternating, start_streamflow
from streamflow.serving.v1 import prediction_service_pb2 as pb


@dataclass(frozen=True)
class Cost:
    off_p50_ms: float
    on_p50_ms: float
    off_rps32: float
    on_rps32: float
    answered: int
    logged: int


def _measure(
    env: dict[str, str], user_id: str, duration: float, logged: bool, home: Path, log: Path
) -> tuple[float, float, int, int]:
    """(p50 at concurrency 1 in ms, calls/s at concurrency 32, calls answered, rows logged) of one fresh
    server."""
    folder = home / "predictions"
    shutil.rmtree(folder, ignore_errors=True)
    served = start_streamflow(env, {"STREAMFLOW_PREDICTION_LOG": str(logged).lower()}, log)
    try:
        endpoint = h2load.grpc_call(served.base, "Predict", pb.PredictRequest(user_id=user_id))
        one = h2load.run(endpoint, 1, duration, warm_up_s=0)
        many = h2load.run(endpoint, 32, duration, warm_up_s=0)
    finally:
        served.service.stop()  # SIGTERM: the log is flushed before the server exits
    rows = sum(pq.read_metadata(path).num_rows for path in folder.glob("*.parquet")) if logged else 0
    shutil.rmtree(folder, ignore_errors=True)
    answered = one.requests - one.failed + many.requests - many.failed
    return one.percentile(50), many.throughput, answered, rows


def measure_cost(
    env: dict[str, str], home: Path, user_id: str, duration: float, rounds: int, log: Path
) -> Cost:
    figures = alternating(
        rounds,
        {
            "off": lambda: _measure(env, user_id, duration, False, home, log),
            "on": lambda: _measure(env, user_id, duration, True, home, log),
        },
        "prediction log",
    )
    off, on = figures["off"], figures["on"]
    return Cost(
        median(f[0] for f in off),
        median(f[0] for f in on),
        median(f[1] for f in off),
        median(f[1] for f in on),
        sum(f[2] for f in on),
        sum(f[3] for f in on),
    )


def render(cost: Cost) -> str:
    p50_delta = cost.on_p50_ms - cost.off_p50_ms
    rps_delta = (cost.on_rps32 - cost.off_rps32) / cost.off_rps32 * 100
    return "\n".join(
        [
            "",
            "Predict with the prediction log on beside off (same server build, started in turn; medians):",
            "",
            "| measure | log off | log on | cost |",
            "|---|---:|---:|---:|",
            f"| Predict p50, concurrency 1 (ms) | {cost.off_p50_ms:.3f} | {cost.on_p50_ms:.3f} | "
            f"{p50_delta:+.3f} ms |",
            f"| Predict calls/s, concurrency 32 | {cost.off_rps32:,.0f} | {cost.on_rps32:,.0f} | "
            f"{rps_delta:+.1f}% |",
            f"| rows logged / calls answered, log on | | {cost.logged:,} / {cost.answered:,} | |",
            "",
        ]
    )
