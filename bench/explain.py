"""What an explanation costs; part of `make bench` (`--explain-only` runs it alone).

One `streamflow serve` (its default workers) on the bench home (the 300-tree demo model): h2load drives
Predict at concurrency 1 without and with `explain`, and BatchPredict of 100 users without and with it, in
turn round after round so the machine's drift falls on both alike. Each request is checked once with a real
client first (h2load sees only HTTP 200): the explained answers must carry one contribution per feature
adding up, with ModelInfo's base value, to the churn probability. Issue 14's budget: Predict with `explain`
under 10 ms p50 at concurrency 1, BatchPredict of 100 with `explain` under 200 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import median

import grpc
from google.protobuf.message import Message

from bench import h2load
from bench.services import start_streamflow
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc

BATCH = 100
PREDICT_BUDGET_MS = 10.0
BATCH_BUDGET_MS = 200.0


@dataclass(frozen=True)
class Cost:
    """Medians over the rounds, in ms."""

    predict_p50: float
    explained_predict_p50: float
    batch_p50: float
    explained_batch_p50: float


def _check(port: int, users: list[str]) -> None:
    """The explained answers are what h2load will be timing: complete and additive."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        base = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).base_value
        predictions = [stub.Predict(pb.PredictRequest(user_id=users[0], explain=True), timeout=30).prediction]
        batch = stub.BatchPredict(pb.BatchPredictRequest(user_ids=users[:BATCH], explain=True), timeout=60)
    predictions += [r.prediction for r in batch.results]
    for prediction in predictions:
        total = base + sum(c.contribution for c in prediction.contributions)
        if (
            len(prediction.contributions) != len(prediction.features)
            or abs(total - prediction.churn_probability) > 1e-6
        ):
            raise RuntimeError(f"an explained prediction of {prediction.user_id} does not add up")


def measure_cost(env: dict[str, str], users: list[str], duration: float, rounds: int, log: Path) -> Cost:
    served = start_streamflow(env, {}, log)
    try:
        _check(served.port, users)

        def endpoint(method: str, request: Message) -> h2load.Endpoint:
            return h2load.grpc_call(served.base, method, request)

        loads = {
            "predict": endpoint("Predict", pb.PredictRequest(user_id=users[0])),
            "explained_predict": endpoint("Predict", pb.PredictRequest(user_id=users[0], explain=True)),
            "batch": endpoint("BatchPredict", pb.BatchPredictRequest(user_ids=users[:BATCH])),
            "explained_batch": endpoint(
                "BatchPredict", pb.BatchPredictRequest(user_ids=users[:BATCH], explain=True)
            ),
        }
        figures: dict[str, list[float]] = {name: [] for name in loads}
        for round_ in range(rounds):
            print(f"  explanations, round {round_ + 1} of {rounds}", flush=True)
            for name, load in loads.items():
                figures[name].append(h2load.run(load, 1, duration).percentile(50))
    finally:
        served.service.stop()
    return Cost(*(median(figures[name]) for name in loads))


def render(cost: Cost) -> str:
    def verdict(value: float, budget: float) -> str:
        return "met" if value < budget else "missed"

    return "\n".join(
        [
            "",
            "Explanations (exact TreeSHAP, 14 features), concurrency 1, p50 in ms (medians of the rounds):",
            "",
            "| call | without `explain` | with `explain` | budget |",
            "|---|---:|---:|---:|",
            f"| Predict | {cost.predict_p50:.2f} | {cost.explained_predict_p50:.2f} | "
            f"< {PREDICT_BUDGET_MS:g} ({verdict(cost.explained_predict_p50, PREDICT_BUDGET_MS)}) |",
            f"| BatchPredict of {BATCH} | {cost.batch_p50:.2f} | {cost.explained_batch_p50:.2f} | "
            f"< {BATCH_BUDGET_MS:g} ({verdict(cost.explained_batch_p50, BATCH_BUDGET_MS)}) |",
            "",
        ]
    )
