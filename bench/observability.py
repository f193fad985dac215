"""What watching the server costs, and whether health stays fast under a flood; part of `make bench`.

- Cost: the same `streamflow serve` with metrics and access logs on (the defaults) and off, started in turn
  round after round (so the machine's drift falls on both alike), each driven by h2load: Predict p50 at
  concurrency 1 and Predict/s at concurrency 32. Tracing stays off in both (it is off unless an OTLP endpoint
  is set). Budget (issue 10): at most 5% of throughput and 0.05 ms of p50.
- Health under a flood: while h2load floods Predict far past `STREAMFLOW_MAX_CONCURRENT_RPCS`, two probes open
  a fresh connection per `grpc.health.v1.Health/Check`, as the kubelet does: one on the health port (which the
  supervisor answers, as the Kubernetes probes use it), one on the main port (a flooded worker's event loop);
  their p99 (target: under 100 ms) and the flood's answers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import h2load
from bench.services import Served, alternating, free_port, start_streamflow
from streamflow.serving.v1 import prediction_service_pb2 as pb

OBSERVABILITY_OFF = {"STREAMFLOW_METRICS_PORT": "0", "STREAMFLOW_ACCESS_LOG_RATE": "0"}
"""The settings that turn metrics and access logs off."""


@dataclass(frozen=True)
class Cost:
    on_p50_ms: float
    off_p50_ms: float
    on_rps32: float
    off_rps32: float


@dataclass(frozen=True)
class Probes:
    """One probe's answers during the flood."""

    count: int
    failures: int
    p50_ms: float
    p99_ms: float
    worst_ms: float


@dataclass(frozen=True)
class HealthUnderFlood:
    health_port: Probes
    main_port: Probes
    flood_rps: float
    flood_http_failures: int


def _predict(served: Served, user_id: str) -> h2load.Endpoint:
    return h2load.grpc_call(served.base, "Predict", pb.PredictRequest(user_id=user_id))


def _measure(
    env: dict[str, str], extra: dict[str, str], user_id: str, duration: float, log: Path
) -> tuple[float, float]:
    """(p50 at concurrency 1 in ms, calls/s at concurrency 32) of one fresh server."""
    served = start_streamflow(env, extra, log)
    try:
        endpoint = _predict(served, user_id)
        return h2load.run(endpoint, 1, duration).percentile(50), h2load.run(endpoint, 32, duration).throughput
    finally:
        served.service.stop()


def measure_cost(env: dict[str, str], user_id: str, duration: float, rounds: int, log: Path) -> Cost:
    def metrics_on() -> dict[str, str]:
        return {"STREAMFLOW_METRICS_PORT": str(free_port())}

    figures = alternating(
        rounds,
        {
            "on": lambda: _measure(
                env, {"STREAMFLOW_METRICS_PORT": str(free_port())}, user_id, duration, log
            ),
            "off": lambda: _measure(env, OBSERVABILITY_OFF, user_id, duration, log),
        },
        "observability",
    )
    on, off = figures["on"], figures["off"]
    return Cost(
        median(p50 for p50, _ in on),
        median(p50 for p50, _ in off),
        median(rps for _, rps in on),
        median(rps for _, rps in off),
    )


def measure_health_under_flood(
    env: dict[str, str], user_id: str, duration: float, log: Path
) -> HealthUnderFlood:
    served = start_streamflow(env, {"STREAMFLOW_MAX_CONCURRENT_RPCS": "16"}, log)
    health_port, port = served.health_port, served.port
    flooding = threading.Event()
    latencies: dict[int, list[float]] = {health_port: [], port: []}
    failures = dict.fromkeys(latencies, 0)

    def probe(target: int) -> None:
        while not flooding.is_set():
            time.sleep(0.01)
        while flooding.is_set():
            with grpc.insecure_channel(f"127.0.0.1:{target}") as channel:  # a fresh connection per probe
                started = time.perf_counter()
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        failures[target] += 1
                except grpc.RpcError:
                    failures[target] += 1
                latencies[target].append((time.perf_counter() - started) * 1000)
            time.sleep(0.02)

    probers = [threading.Thread(target=probe, args=(target,)) for target in latencies]
    for prober in probers:
        prober.start()
    try:
        flooding.set()
        # 256 connections, 8 streams each: far past the 16 calls a worker admits at once.
        flood = h2load.run(_predict(served, user_id), 256, duration, streams=8)
    finally:
        flooding.clear()
        for prober in probers:
            prober.join()
        served.service.stop()

    def probes(target: int) -> Probes:
        ordered = sorted(latencies[target])
        return Probes(
            len(ordered), failures[target], median(ordered), ordered[int(len(ordered) * 0.99)], ordered[-1]
        )

    return HealthUnderFlood(probes(health_port), probes(port), flood.throughput, flood.failed)


def render(cost: Cost, health: HealthUnderFlood) -> str:
    p50_delta = cost.on_p50_ms - cost.off_p50_ms
    rps_delta = (cost.off_rps32 - cost.on_rps32) / cost.off_rps32 * 100
    return "\n".join(
        [
            "",
            "What watching costs (metrics and access logs on vs off, tracing off; medians, same runs):",
            "",
            "| measure | on | off | cost | budget |",
            "|---|---:|---:|---:|---:|",
            f"| Predict p50, concurrency 1 (ms) | {cost.on_p50_ms:.3f} | {cost.off_p50_ms:.3f} | "
            f"{p50_delta:+.3f} ms | 0.05 ms |",
            f"| Predict calls/s, concurrency 32 | {cost.on_rps32:,.0f} | {cost.off_rps32:,.0f} | "
            f"{rps_delta:+.1f}% | 5% |",
            "",
            f"Health under a flood (256 connections x 8 streams of Predict, "
            f"{health.flood_rps:,.0f} answers/s, "
            f"at most 16 calls admitted per worker; HTTP failures {health.flood_http_failures}), "
            "probes on fresh connections (target: p99 under 100 ms):",
            "",
            "| probe | probes | not SERVING | p50 (ms) | p99 (ms) | worst (ms) |",
            "|---|---:|---:|---:|---:|---:|",
            *(
                f"| {name} | {p.count} | {p.failures} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | {p.worst_ms:.1f} |"
                for name, p in (
                    ("health port (the supervisor)", health.health_port),
                    ("main port (a flooded worker)", health.main_port),
                )
            ),
            "",
        ]
    )
