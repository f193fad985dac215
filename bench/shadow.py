"""What shadow scoring costs a Predict; part of `make bench` (alone: `python -m bench.run --shadow-only`).

The same `streamflow serve` (its default workers) without a shadow and with `STREAMFLOW_SHADOW_MODEL_URI` at
`STREAMFLOW_SHADOW_SAMPLE=1.0` (every user scored again by a second forest of the same size: the Production
version itself, followed as the shadow), started in turn round after round so the machine's drift falls on
both alike; the prediction log is off in both, so the table shows the shadow alone. h2load drives Predict:
p50 at concurrency 1 and calls/s at concurrency 32 (issue 14's budget: the shadow costs at most 15% of it).
Then BatchPredicts of 1,000 users run for a few seconds (the shadow scores those users too), and each
worker's resident memory is read, as issue 13 measures it (under 200 MB), with and without the second forest.
After each shadowed run ModelInfo is read: the users the shadow compared and dropped (the queue was full)
are shown against the users answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import grpc

from bench import h2load
from bench.services import alternating, start_streamflow
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc

SHADOW_URI = "models:/streamflow_churn/Production"


@dataclass(frozen=True)
class Cost:
    off_p50_ms: float
    on_p50_ms: float
    off_rps32: float
    on_rps32: float
    answered: int
    compared: int
    dropped: int
    off_rss_mb: float
    """The largest worker RSS after the batches, over every round."""
    on_rss_mb: float


def _shadow_counts(port: int) -> tuple[int, int]:
    """(users compared, users dropped) as ModelInfo reports them, summed over the workers."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = pb_grpc.PredictionServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30)
    return sum(c.users_compared for c in info.shadow.comparisons), info.shadow.users_dropped


BATCH_USERS = 1000
BATCH_SECONDS = 3.0


def _measure(
    env: dict[str, str], users: list[str], duration: float, shadowed: bool, log: Path
) -> tuple[float, float, int, int, int, float]:
    """(p50 at concurrency 1 in ms, calls/s at concurrency 32, users answered, users compared, users
    dropped, largest worker RSS in MB after the batches) of one fresh server."""
    extra = {
        "STREAMFLOW_PREDICTION_LOG": "false",
        "STREAMFLOW_SHADOW_MODEL_URI": SHADOW_URI if shadowed else "",
        "STREAMFLOW_SHADOW_SAMPLE": "1.0",
    }
    served = start_streamflow(env, extra, log)
    port = served.port
    try:
        if shadowed and not _wait(lambda: _shadow_loaded(port), 120):
            raise RuntimeError(f"the shadow {SHADOW_URI} did not load; see {log}")
        endpoint = h2load.grpc_call(served.base, "Predict", pb.PredictRequest(user_id=users[0]))
        one = h2load.run(endpoint, 1, duration, warm_up_s=0)
        many = h2load.run(endpoint, 32, duration, warm_up_s=0)
        batch = h2load.run(
            h2load.grpc_call(
                served.base, "BatchPredict", pb.BatchPredictRequest(user_ids=users[:BATCH_USERS])
            ),
            2,
            BATCH_SECONDS,
            warm_up_s=0,
        )
        rss = max(served.service.worker_rss_mb().values())
        answered = one.requests - one.failed + many.requests - many.failed
        answered += (batch.requests - batch.failed) * _scored(port, users[:BATCH_USERS])
        compared, dropped = 0, 0
        if shadowed:
            # The workers report every half second, and the queue empties after the load: wait until
            # every answered user is accounted for, or give up after a while and show what is.
            _wait(lambda: sum(_shadow_counts(port)) >= answered, 30)
            compared, dropped = _shadow_counts(port)
    finally:
        served.service.stop()
    return one.percentile(50), many.throughput, answered, compared, dropped, rss


def _scored(port: int, users: list[str]) -> int:
    """How many of `users` a BatchPredict scores (the others, departed or unknown, the shadow never sees)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.PredictionServiceStub(channel).BatchPredict(
            pb.BatchPredictRequest(user_ids=users), timeout=60
        )
    return sum(result.HasField("prediction") for result in reply.results)


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` held within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _shadow_loaded(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            info = pb_grpc.PredictionServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return info.shadow.HasField("model")


def measure_cost(env: dict[str, str], users: list[str], duration: float, rounds: int, log: Path) -> Cost:
    figures = alternating(
        rounds,
        {
            "off": lambda: _measure(env, users, duration, False, log),
            "on": lambda: _measure(env, users, duration, True, log),
        },
        "shadow",
    )
    off, on = figures["off"], figures["on"]
    return Cost(
        median(f[0] for f in off),
        median(f[0] for f in on),
        median(f[1] for f in off),
        median(f[1] for f in on),
        sum(f[2] for f in on),
        sum(f[3] for f in on),
        sum(f[4] for f in on),
        max(f[5] for f in off),
        max(f[5] for f in on),
    )


def render(cost: Cost) -> str:
    p50_delta = cost.on_p50_ms - cost.off_p50_ms
    rps_delta = (cost.on_rps32 - cost.off_rps32) / cost.off_rps32 * 100
    return "\n".join(
        [
            "",
            "Predict with a shadow model at sample 1.0 beside none (same build, started in turn; medians):",
            "",
            "| measure | no shadow | shadow | cost |",
            "|---|---:|---:|---:|",
            f"| Predict p50, concurrency 1 (ms) | {cost.off_p50_ms:.3f} | {cost.on_p50_ms:.3f} | "
            f"{p50_delta:+.3f} ms |",
            f"| Predict calls/s, concurrency 32 | {cost.off_rps32:,.0f} | {cost.on_rps32:,.0f} | "
            f"{rps_delta:+.1f}% (budget -15%) |",
            f"| largest worker RSS after BatchPredicts of {BATCH_USERS:,} users (MB) | "
            f"{cost.off_rss_mb:.0f} | {cost.on_rss_mb:.0f} | "
            f"{cost.on_rss_mb - cost.off_rss_mb:+.0f} MB (target under 200) |",
            f"| users compared / dropped / users answered, shadow on | | "
            f"{cost.compared:,} / {cost.dropped:,} / {cost.answered:,} | |",
            "",
        ]
    )
