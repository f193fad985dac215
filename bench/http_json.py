"""Predict over HTTP/JSON (Connect) beside gRPC on the same server; part of `make bench`.

One `streamflow serve` with its HTTP port on; h2load drives Predict over gRPC, over HTTP/1.1 with a JSON body
(`--h1`, keep-alive connections) and over HTTP/2 without TLS with the same JSON body, in turn round after
round so the machine's drift falls on all alike: p50 at concurrency 1 and calls/s at concurrency 32.

A Connect error has an HTTP status of its own, so h2load's 200s over HTTP/2 are successes. Over HTTP/1.1
h2load cannot read Hypercorn's status line (it has no reason phrase), so a real client checks that the same
request answers a prediction before and after each HTTP/1.1 run.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from bench import h2load
from bench.services import BIN, free_port, grpc_serving, start
from streamflow.serving.v1 import prediction_service_pb2 as pb

SERVICE = "streamflow.serving.v1.PredictionService"
TRANSPORTS = ("gRPC", "HTTP/1.1 JSON", "HTTP/2 JSON (h2c)")


@dataclass(frozen=True)
class Figures:
    """Per transport, medians: p50 in ms at concurrency 1, calls/s at concurrency 32."""

    p50_ms: dict[str, float]
    rps32: dict[str, float]


def _check_json(endpoint: h2load.Endpoint) -> None:
    request = urllib.request.Request(
        endpoint.url, data=endpoint.body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        if "prediction" not in json.load(reply):
            raise SystemExit(f"{endpoint.url} answered without a prediction")


def _endpoints(port: int, http_port: int, user_id: str) -> dict[str, h2load.Endpoint]:
    url = f"http://127.0.0.1:{http_port}/{SERVICE}/Predict"
    body = json.dumps({"userId": user_id}).encode()
    return {
        "gRPC": h2load.Endpoint(
            f"http://127.0.0.1:{port}/{SERVICE}/Predict",
            h2load.grpc_frame(pb.PredictRequest(user_id=user_id).SerializeToString()),
            h2load.GRPC_HEADERS,
        ),
        "HTTP/1.1 JSON": h2load.Endpoint(url, body, h2load.JSON_HEADERS, http1=True, status_unreadable=True),
        "HTTP/2 JSON (h2c)": h2load.Endpoint(url, body, h2load.JSON_HEADERS),
    }


def measure(env: dict[str, str], user_id: str, duration: float, rounds: int, log: Path) -> Figures:
    port, http_port = free_port(), free_port()
    extra = {
        "STREAMFLOW_HOST": "127.0.0.1",
        "STREAMFLOW_PORT": str(port),
        "STREAMFLOW_HTTP_PORT": str(http_port),
    }
    command = [str(BIN / "streamflow"), "serve"]
    service = start("StreamFlow gRPC + HTTP", command, {**env, **extra}, grpc_serving, port, log)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in TRANSPORTS}
    try:
        endpoints = _endpoints(port, http_port, user_id)
        for round_ in range(rounds):
            for name, endpoint in endpoints.items():
                print(f"  Predict over {name}, round {round_ + 1} of {rounds}", flush=True)
                if endpoint.status_unreadable:
                    _check_json(endpoint)
                one, many = h2load.run(endpoint, 1, duration), h2load.run(endpoint, 32, duration)
                if endpoint.status_unreadable:
                    _check_json(endpoint)
                if one.failed or many.failed:
                    raise SystemExit(f"{name}: {one.failed + many.failed} failed requests")
                runs[name].append((one.percentile(50), many.throughput))
    finally:
        service.stop()
    return Figures(
        {name: median(p50 for p50, _ in runs[name]) for name in TRANSPORTS},
        {name: median(rps for _, rps in runs[name]) for name in TRANSPORTS},
    )


def render(figures: Figures) -> str:
    p50 = " | ".join(f"{figures.p50_ms[name]:.3f}" for name in TRANSPORTS)
    rps = " | ".join(f"{figures.rps32[name]:,.0f}" for name in TRANSPORTS)
    return "\n".join(
        [
            "",
            "Predict over HTTP/JSON (Connect) beside gRPC, the same server (medians):",
            "",
            f"| measure | {' | '.join(TRANSPORTS)} |",
            "|---|---:|---:|---:|",
            f"| Predict p50, concurrency 1 (ms) | {p50} |",
            f"| Predict calls/s, concurrency 32 | {rps} |",
            "",
        ]
    )
