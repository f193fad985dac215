"""`make bench`: StreamFlow's gRPC server against the alternatives, measured side by side in one run.

Compared one at a time, on the same machine and data (the default demo: 7,043 users, 300 trees, in its own
home `.streamflow-bench/`, bootstrapped when missing):

- StreamFlow: `streamflow serve` (its default worker count), driven over gRPC by h2load;
- the floor: the server's own feature read and inference in this process, without any RPC;
- the Feast SDK path: `get_online_features` feeding the same model, in this process;
- the seed-style REST service (bench/seed_rest_service.py: FastAPI + Feast SDK + MLflow pyfunc), one process;
- `mlflow models serve` of the same model version, features in the request, StreamFlow's worker count.

Predict asks for the first demo user, BatchPredict for the first 100 / 1,000 users of the last snapshot.
Each load runs three times and the table keeps the median of each figure. Nothing here asserts a time: it
prints one table, also written to
bench/results/latest.md and bench/RESULTS.md.

The rows of time inside the server, and the line under the table that splits a Predict's into its feature
read, inference and the rest, come from the server's own histograms (bench/inside.py). Below that: each
StreamFlow worker's RSS after the BatchPredict 1,000-user load (issue 13's 200 MB), then
the watching, security and HTTP tables, then the 1M-user row (bench/scale.py: a production-profile stack of
its own; `--scale-only` runs it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

import grpc
import pandas as pd
from grpc_health.v1 import health_pb2

from bench import h2load, http_json, inside, observability, prediction_log, scale, security, shadow, skew
from bench.explain import measure_cost as explain_cost
from bench.explain import render as render_explain
from bench.floor import feast_sdk_call, feature_frame, floor_call, load_served_model, time_calls
from bench.services import BIN, Service, free_port, grpc_serving, http_ok, start
from streamflow.feature_repo.definitions import SNAPSHOT_DATES, VIEW_SPECS
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".streamflow-bench"
RESULTS = ROOT / "bench" / "results"
SERVICE = "streamflow.serving.v1.PredictionService"
BATCH_SIZES = (100, 1000)


@dataclass(frozen=True)
class Metric:
    """One row of the table; `lower_is_better` decides which way its ratios are taken."""

    key: str
    label: str
    lower_is_better: bool


WORKER_RSS_TARGET_MB = 200
"""Issue 13: a scoring worker under this RSS after 1,000-user batches."""

METRICS = (
    Metric("p50", "Predict p50, concurrency 1 (ms)", True),
    Metric("p99", "Predict p99, concurrency 1 (ms)", True),
    Metric("rps1", "Predict calls/s, concurrency 1", False),
    Metric("rps8", "Predict calls/s, concurrency 8", False),
    Metric("rps32", "Predict calls/s, concurrency 32", False),
    Metric("inside1", "time inside the server per call, concurrency 1 (ms, mean)", True),
    Metric("inside32", "time inside the server per call, concurrency 32 (ms, mean)", True),
    Metric("batch100", "BatchPredict 100 users p50 (ms)", True),
    Metric("batch1000", "BatchPredict 1,000 users p50 (ms)", True),
    Metric("rss_total", "memory of all processes, PSS (MB)", True),
    Metric("rss_worker", "resident memory of the largest process, RSS (MB)", True),
    Metric(
        "rss_after_batches",
        f"largest worker RSS after BatchPredict 1,000 users (MB; target under {WORKER_RSS_TARGET_MB})",
        True,
    ),
)


@dataclass
class Column:
    """One compared system's figures, keyed like METRICS."""

    name: str
    values: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    worker_rss_mb: dict[int, float] = field(default_factory=dict)
    """Each worker's RSS by pid, read after the BatchPredict 1,000-user load (StreamFlow only)."""
    parts_ms: dict[str, float] = field(default_factory=dict)
    """Mean ms of each part of `inside.PARTS` within the calls of the concurrency-1 load (StreamFlow only)."""


def demo_users(settings: Settings) -> list[str]:
    """Users of the last snapshot, in file order (the first one is the demo's first user, 7590-VHVEG)."""
    table = pd.read_parquet(
        settings.data_dir / f"{VIEW_SPECS[0].table}.parquet", columns=["user_id", "as_of"]
    )
    last = table["as_of"].dt.date == max(SNAPSHOT_DATES)
    return list(table.loc[last, "user_id"].head(max(BATCH_SIZES)))


def bootstrap(env: dict[str, str]) -> None:
    """`streamflow bootstrap` in the bench home: idempotent, takes seconds when everything is in place."""
    print(f"bootstrapping {HOME} (skipped quickly when already done) ...", flush=True)
    subprocess.run([str(BIN / "streamflow"), "bootstrap"], env={**os.environ, **env}, check=True)


def measure_in_process(settings: Settings, users: list[str], sdk_path: bool = True) -> tuple[Column, Column]:
    """The floor's figures, and the Feast SDK path's unless `sdk_path` is off (its column stays empty)."""
    model, store = load_served_model(settings)
    floor, sdk = Column("floor (in-process)"), Column("Feast SDK path (in-process)")
    measured = [(floor, lambda ids: floor_call(model, ids))]
    if sdk_path:
        measured.append((sdk, lambda ids: feast_sdk_call(model, store, ids)))
    for column, make in measured:
        one = time_calls(make(users[:1]), repeat=2000)
        column.values.update(p50=one.percentile(50), p99=one.percentile(99), rps1=one.calls_per_s)
        for size in BATCH_SIZES:
            column.values[f"batch{size}"] = time_calls(
                make(users[:size]), repeat=max(20, 20_000 // size)
            ).percentile(50)
    return floor, sdk


def measure_service(
    service: Service,
    predict: h2load.Endpoint,
    batches: dict[int, h2load.Endpoint],
    duration: float,
    rounds: int,
    what: str = "Predict",
    metrics_port: int | None = None,
) -> Column:
    """Drive one running service with h2load, `rounds` runs of each load, and keep each figure's median (a
    shared machine's speed drifts within minutes); memory is read after each run and the largest kept. With
    the `metrics_port` of a StreamFlow server, the mean time the calls of `predict`'s method spent inside it
    at concurrency 1 and 32 is read from its histograms (bench/inside.py)."""
    column = Column(service.name)
    method = predict.url.rsplit("/", 1)[-1]  # the gRPC method's name, as the histograms label it

    def measured(endpoint: h2load.Endpoint, concurrency: int) -> list[h2load.LoadResult]:
        results = []
        for _ in range(rounds):
            result = h2load.run(endpoint, concurrency, duration)
            total, largest = service.memory_mb()
            column.values["rss_total"] = max(column.values.get("rss_total", 0.0), total)
            column.values["rss_worker"] = max(column.values.get("rss_worker", 0.0), largest)
            column.failed += result.failed
            results.append(result)
        return results

    for concurrency in (1, 8, 32):
        print(f"  {service.name}: {what} at concurrency {concurrency}", flush=True)
        before = inside.read(metrics_port) if metrics_port and concurrency in (1, 32) else None
        results = measured(predict, concurrency)
        column.values[f"rps{concurrency}"] = median(r.throughput for r in results)
        if before is not None and metrics_port:
            after = inside.read(metrics_port)
            handler_ms = inside.mean_ms(before, after, inside.HANDLING, method)
            if handler_ms is not None:
                column.values[f"inside{concurrency}"] = handler_ms
            if concurrency == 1:
                for part, histogram in inside.PARTS.items():
                    if (part_ms := inside.mean_ms(before, after, histogram)) is not None:
                        column.parts_ms[part] = part_ms
        if concurrency == 1:
            column.values.update(
                p50=median(r.percentile(50) for r in results), p99=median(r.percentile(99) for r in results)
            )
    for size, endpoint in batches.items():
        print(f"  {service.name}: batch of {size}", flush=True)
        column.values[f"batch{size}"] = median(r.percentile(50) for r in measured(endpoint, 1))
    return column


def check_grpc(port: int, users: list[str]) -> None:
    """h2load sees only HTTP 200: check the grpc-status of the same requests with a real client."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        stub.Predict(pb.PredictRequest(user_id=users[0]), timeout=10)
        for size in BATCH_SIZES:
            reply = stub.BatchPredict(pb.BatchPredictRequest(user_ids=users[:size]), timeout=30)
            if any(r.HasField("error") for r in reply.results):
                raise SystemExit("BatchPredict returned per-user errors for benchmark users")


def check_http(endpoint: h2load.Endpoint) -> None:
    request = urllib.request.Request(
        endpoint.url, data=endpoint.body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        if reply.status != 200:
            raise SystemExit(f"{endpoint.url} answered {reply.status}")


def json_endpoint(url: str, payload: object) -> h2load.Endpoint:
    return h2load.Endpoint(url, json.dumps(payload).encode(), h2load.JSON_HEADERS, http1=True)


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
"""The bare call of this server stack: routing, the call layer and a tiny answer; no features, no model."""


def bench_streamflow(
    env: dict[str, str], users: list[str], duration: float, rounds: int, log: Path
) -> tuple[Column, Column]:
    """StreamFlow's figures, and the bare call's (a health Check) measured the same way on the same server:
    the floor of the stack, against which Predict's own cost reads."""
    port, metrics_port = free_port(), free_port()
    service = start(
        "StreamFlow gRPC",
        [str(BIN / "streamflow"), "serve"],
        {
            **env,
            "STREAMFLOW_HOST": "127.0.0.1",
            "STREAMFLOW_PORT": str(port),
            "STREAMFLOW_METRICS_PORT": str(metrics_port),
        },
        grpc_serving,
        port,
        log,
    )
    try:
        check_grpc(port, users)
        base = f"http://127.0.0.1:{port}/{SERVICE}"

        def endpoint(method: str, request: bytes) -> h2load.Endpoint:
            return h2load.Endpoint(f"{base}/{method}", h2load.grpc_frame(request), h2load.GRPC_HEADERS)

        predict = endpoint("Predict", pb.PredictRequest(user_id=users[0]).SerializeToString())
        batches = {
            n: endpoint("BatchPredict", pb.BatchPredictRequest(user_ids=users[:n]).SerializeToString())
            for n in BATCH_SIZES
        }
        ours = measure_service(service, predict, batches, duration, rounds, metrics_port=metrics_port)
        ours.worker_rss_mb = service.worker_rss_mb()  # the 1,000-user batches were the last load
        ours.values["rss_after_batches"] = max(ours.worker_rss_mb.values())
        check = h2load.Endpoint(
            f"http://127.0.0.1:{port}{HEALTH_CHECK}",
            h2load.grpc_frame(health_pb2.HealthCheckRequest().SerializeToString()),
            h2load.GRPC_HEADERS,
        )
        bare = measure_service(service, check, {}, duration, rounds, "health Check", metrics_port)
        bare.name = "bare call (health Check, same server)"
        for key in ("rss_total", "rss_worker"):  # the same processes: their memory is StreamFlow's column
            bare.values.pop(key)
        return ours, bare
    finally:
        service.stop()


def bench_seed(env: dict[str, str], users: list[str], duration: float, rounds: int, log: Path) -> Column:
    port = free_port()
    args = [sys.executable, "-m", "bench.seed_rest_service", "--port", str(port)]
    service = start("seed REST", args, env, http_ok("/openapi.json"), port, log)
    try:
        base = f"http://127.0.0.1:{port}"
        predict = json_endpoint(f"{base}/predict", {"user_id": users[0]})
        batches = {n: json_endpoint(f"{base}/batch_predict", {"user_ids": users[:n]}) for n in BATCH_SIZES}
        for endpoint in (predict, *batches.values()):
            check_http(endpoint)
        return measure_service(service, predict, batches, duration, rounds)
    finally:
        service.stop()


def bench_mlflow(
    settings: Settings,
    env: dict[str, str],
    frames: dict[int, pd.DataFrame],
    workers: int,
    duration: float,
    rounds: int,
    log: Path,
) -> Column:
    port = free_port()
    args = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        settings.model_uri,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    args += ["--env-manager", "local", "-w", str(workers)]
    service = start(
        "mlflow models serve",
        args,
        # mlflow runs `uvicorn` from PATH, which a venv not activated does not have.
        {**env, "MLFLOW_TRACKING_URI": settings.tracking_uri, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"},
        http_ok("/ping"),
        port,
        log,
    )
    try:
        url = f"http://127.0.0.1:{port}/invocations"

        def endpoint(frame: pd.DataFrame) -> h2load.Endpoint:
            split = json.loads(frame.to_json(orient="split", index=False))
            return json_endpoint(url, {"dataframe_split": split})

        predict = endpoint(frames[1])
        batches = {n: endpoint(frames[n]) for n in BATCH_SIZES}
        for each in (predict, *batches.values()):
            check_http(each)
        return measure_service(service, predict, batches, duration, rounds)
    finally:
        service.stop()


def ratio(ours: float | None, other: float | None, lower_is_better: bool) -> str:
    """How many times better StreamFlow is than `other` (below 1: worse)."""
    if not ours or not other:
        return "—"
    return f"{(other / ours) if lower_is_better else (ours / other):,.1f}x"


def cell(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def cost_over(mine: float | None, base: float | None, lower_is_better: bool) -> str:
    """StreamFlow's cost over a base (1.00 = none): latency mine ÷ base, throughput base ÷ mine."""
    if not mine or not base:
        return "—"
    return f"{(mine / base) if lower_is_better else (base / mine):,.2f}"


def render(columns: list[Column], header: str) -> str:
    ours, bare, floor, sdk, seed, mlflow_serve = columns
    names = [c.name for c in columns]
    lines = [
        header,
        "",
        "| measure | "
        + " | ".join(names)
        + " | vs seed REST | vs mlflow serve | vs Feast SDK path | ÷ bare call | ÷ floor |",
        "|---|" + "---:|" * (len(names) + 5),
    ]
    for metric in METRICS:
        values = [c.values.get(metric.key) for c in columns]
        mine = ours.values.get(metric.key)
        lines.append(
            f"| {metric.label} | "
            + " | ".join(cell(v) for v in values)
            + f" | {ratio(mine, seed.values.get(metric.key), metric.lower_is_better)}"
            + f" | {ratio(mine, mlflow_serve.values.get(metric.key), metric.lower_is_better)}"
            + f" | {ratio(mine, sdk.values.get(metric.key), metric.lower_is_better)}"
            + f" | {cost_over(mine, bare.values.get(metric.key), metric.lower_is_better)}"
            + f" | {cost_over(mine, floor.values.get(metric.key), metric.lower_is_better)} |"
        )
    lines += [
        "",
        'Ratios "vs X": how many times better StreamFlow is than X (latency: X ÷ StreamFlow; throughput',
        'and memory the same way round, so above 1x favours StreamFlow). "÷ bare call" and "÷ floor":',
        "StreamFlow's cost over a health Check on the same server (the stack's own floor: the Predict rows",
        "of the bare-call column are that Check, driven the same way) and over the in-process feature read",
        "and inference (1.00 = no overhead; latency StreamFlow ÷ base, throughput base ÷ StreamFlow). Failed",
        "requests: "
        + ", ".join(f"{c.name} {c.failed}" for c in columns if c.name not in (floor.name, sdk.name))
        + ".",
    ]
    return "\n".join(lines) + "\n"


def worker_rss_line(column: Column) -> str:
    """Each StreamFlow worker's resident memory after the BatchPredict 1,000-user load, against the target."""
    each = ", ".join(f"{mb:,.0f} (pid {pid})" for pid, mb in sorted(column.worker_rss_mb.items()))
    over = sum(mb >= WORKER_RSS_TARGET_MB for mb in column.worker_rss_mb.values())
    return (
        "\nStreamFlow worker RSS after BatchPredict 1,000 users (VmRSS of each child of `streamflow serve`, "
        f"MB): {each}; {over} of {len(column.worker_rss_mb)} at or over the {WORKER_RSS_TARGET_MB} MB "
        "target.\n"
    )


def inside_line(ours: Column, bare: Column) -> str:
    """Where a Predict's time inside the server went at concurrency 1, beside a health Check's."""
    handler, check = ours.values.get("inside1"), bare.values.get("inside1")
    if handler is None or check is None:
        return ""
    parts = ", ".join(f"{part} {ms:.3f} ms" for part, ms in ours.parts_ms.items())
    rest = handler - sum(ours.parts_ms.values())
    return (
        "\nInside the server at concurrency 1 (its own histograms, means): a Predict"
        f" {handler:.3f} ms ({parts}, the rest of its handler {rest:.3f} ms: decoding, the batcher, the"
        f" answer, the prediction log, metrics), a health Check {check:.3f} ms. Everything else in a call's"
        " latency, the client's, the kernel's and grpc's own work around the handler, the two pay alike.\n"
    )


def predict_table(
    env: dict[str, str], settings: Settings, users: list[str], duration: float, rounds: int
) -> str:
    """Issue 13's three figures alone: StreamFlow's Predict and BatchPredict beside the bare call on the same
    server and the in-process floor (a few minutes, for tuning the call path)."""
    print("in-process floor ...", flush=True)
    floor, _ = measure_in_process(settings, users, sdk_path=False)
    ours, bare = bench_streamflow(env, users, duration, rounds, RESULTS / "streamflow.log")
    columns = (ours, bare, floor)
    lines = [
        f"| measure | {' | '.join(c.name for c in columns)} | ÷ bare call | ÷ floor |",
        "|---|" + "---:|" * (len(columns) + 2),
    ]
    for metric in METRICS:
        mine = ours.values.get(metric.key)
        if mine is None:
            continue
        lines.append(
            f"| {metric.label} | "
            + " | ".join(cell(c.values.get(metric.key)) for c in columns)
            + f" | {cost_over(mine, bare.values.get(metric.key), metric.lower_is_better)}"
            + f" | {cost_over(mine, floor.values.get(metric.key), metric.lower_is_better)} |"
        )
    return "\n".join(lines) + "\n" + inside_line(ours, bare) + worker_rss_line(ours)


def watching_table(env: dict[str, str], user_id: str, duration: float, rounds: int) -> str:
    print("cost of metrics and access logs, and health under a flood ...", flush=True)
    log = RESULTS / "observability.log"
    cost = observability.measure_cost(env, user_id, duration, rounds, log)
    health = observability.measure_health_under_flood(env, user_id, duration, log)
    return observability.render(cost, health)


def security_table(env: dict[str, str], user_id: str, duration: float, rounds: int) -> str:
    print("Predict over TLS with a token beside plaintext ...", flush=True)
    cost = security.measure_cost(env, user_id, duration, rounds, RESULTS / "security.log")
    return security.render(cost)


def http_table(env: dict[str, str], user_id: str, duration: float, rounds: int) -> str:
    print("Predict over HTTP/JSON beside gRPC ...", flush=True)
    figures = http_json.measure(env, user_id, duration, rounds, RESULTS / "http_json.log")
    return http_json.render(figures)


def log_table(env: dict[str, str], user_id: str, duration: float, rounds: int) -> str:
    print("Predict with the prediction log on beside off ...", flush=True)
    cost = prediction_log.measure_cost(env, HOME, user_id, duration, rounds, RESULTS / "prediction_log.log")
    return prediction_log.render(cost)


def shadow_table(env: dict[str, str], users: list[str], duration: float, rounds: int) -> str:
    print("Predict with a shadow model beside none ...", flush=True)
    cost = shadow.measure_cost(env, users, duration, rounds, RESULTS / "shadow.log")
    return shadow.render(cost)


def explain_table(env: dict[str, str], users: list[str], duration: float, rounds: int) -> str:
    print("Predict and BatchPredict with explain beside without ...", flush=True)
    return render_explain(explain_cost(env, users, duration, rounds, RESULTS / "explain.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark StreamFlow against the alternatives.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per measured run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each load; the table keeps medians")
    parser.add_argument(
        "--observability-only", action="store_true", help="only the cost of watching and health under a flood"
    )
    parser.add_argument(
        "--security-only", action="store_true", help="only Predict over TLS with a token beside plaintext"
    )
    parser.add_argument("--http-only", action="store_true", help="only Predict over HTTP/JSON beside gRPC")
    parser.add_argument(
        "--log-only", action="store_true", help="only Predict with the prediction log on beside off"
    )
    parser.add_argument(
        "--predict-only",
        action="store_true",
        help="only Predict and BatchPredict beside the bare call and the in-process floor",
    )
    parser.add_argument(
        "--scale-only",
        action="store_true",
        help="only Predict against 1,000,000 users in Redis beside 7,043 (minutes; more to fill Redis once)",
    )
    parser.add_argument(
        "--shadow-only",
        action="store_true",
        help="only Predict with a shadow model at sample 1.0 beside none",
    )
    parser.add_argument(
        "--explain-only",
        action="store_true",
        help="only Predict and BatchPredict of 100 with explanations beside without",
    )
    parser.add_argument(
        "--skew-only", action="store_true", help="only the version skew of promotions under a running server"
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.scale_only:  # its own stack: neither h2load nor the embedded bench home
        print(scale.run_scale(HOME, RESULTS, args.duration, args.rounds))
        return
    h2load.require_h2load()
    # HTTP off unless a measure turns it on: its default port would be shared by the servers started in turn.
    env = {"STREAMFLOW_HOME": str(HOME), "STREAMFLOW_HTTP_PORT": "0"}
    bootstrap(env)
    settings = Settings(home=HOME)
    workers = settings.workers or os.cpu_count() or 1
    users = demo_users(settings)
    if args.predict_only:
        print(predict_table(env, settings, users, args.duration, args.rounds))
        return
    if args.security_only:
        print(security_table(env, users[0], args.duration, args.rounds))
        return
    if args.http_only:
        print(http_table(env, users[0], args.duration, args.rounds))
        return
    if args.log_only:
        print(log_table(env, users[0], args.duration, args.rounds))
        return
    if args.shadow_only:
        print(shadow_table(env, users, args.duration, args.rounds))
        return
    if args.explain_only:
        print(explain_table(env, users, args.duration, args.rounds))
        return
    if args.skew_only:
        print(skew.measure_skew(env, settings, RESULTS / "skew.log"))
        return
    watching = watching_table(env, users[0], args.duration, args.rounds)
    if args.observability_only:
        print(watching)
        return

    print("in-process floor and Feast SDK path ...", flush=True)
    floor, sdk = measure_in_process(settings, users)
    model, _ = load_served_model(settings)
    frames = {n: feature_frame(model, users[:n]) for n in (1, *BATCH_SIZES)}
    runtime = model.runtime
    del model

    ours, bare = bench_streamflow(env, users, args.duration, args.rounds, RESULTS / "streamflow.log")
    seed = bench_seed(env, users, args.duration, args.rounds, RESULTS / "seed_rest.log")
    mlflow_serve = bench_mlflow(
        settings, env, frames, workers, args.duration, args.rounds, RESULTS / "mlflow_serve.log"
    )

    measured = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"# Benchmark, measured {measured}\n\n"
        f"{os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}; "
        f"{settings.users:,} demo users, {settings.n_estimators} trees; StreamFlow runtime {runtime}, "
        f"{workers} workers; mlflow models serve with {workers} workers; seed REST one process; "
        f"{args.duration:g} s of load per run, median of {args.rounds} runs "
        "(h2load, one request in flight per connection)."
    )
    secured = security_table(env, users[0], args.duration, args.rounds)
    over_http = http_table(env, users[0], args.duration, args.rounds)
    logged = log_table(env, users[0], args.duration, args.rounds)
    shadowed = shadow_table(env, users, args.duration, args.rounds)
    explained = explain_table(env, users, args.duration, args.rounds)
    switched = skew.measure_skew(env, settings, RESULTS / "skew.log")
    scaled = scale.run_scale(HOME, RESULTS, args.duration, args.rounds)
    table = (
        render([ours, bare, floor, sdk, seed, mlflow_serve], header)
        + inside_line(ours, bare)
        + worker_rss_line(ours)
        + watching
        + secured
        + over_http
        + logged
        + shadowed
        + explained
        + switched
        + scaled
    )
    print("\n" + table)
    (RESULTS / "latest.md").write_text(table)
    (ROOT / "bench" / "RESULTS.md").write_text(table)


if __name__ == "__main__":
    main()
