"""OpenTelemetry traces, recorded by the real SDK (its in-memory exporter) from a real server over a real
channel: the server span continues the caller's `traceparent`, the steps of a call are its children, a
coalesced batch hangs under its first call and links to the others, and with tracing off nothing is recorded.

A forked multi-worker `streamflow serve` with the SDK's console exporter shows each worker makes its own
tracer provider after the fork and flushes it when it drains.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from streamflow.server import tracing
from streamflow.server.app import PredictionServer
from streamflow.server.batcher import INLINE_BUDGET_S
from streamflow.server.logs import ACCESS_LOGGER, JsonFormatter
from streamflow.server.observers import call_observers
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.processes import START_TIMEOUT_S, serve_env, serving_process
from tests.fixtures.serving import prediction_stub, start_server

PREDICT = "streamflow.serving.v1.PredictionService/Predict"
BATCH_PREDICT = "streamflow.serving.v1.PredictionService/BatchPredict"
STEPS = {"streamflow.feature_read", "streamflow.inference", "streamflow.build_response"}
WAIT_S = 60.0
"""Liveness bound of the waits below, not a performance expectation."""


def traceparent() -> tuple[str, int, int]:
    """A fresh W3C `traceparent` as a client would send it, with its trace id and span id."""
    trace_id, span_id = secrets.randbits(128), secrets.randbits(64)
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


@pytest.fixture
def traced(embedded_settings: Settings) -> Iterator[tuple[PredictionServer, InMemorySpanExporter]]:
    """A server whose process traces into the SDK's in-memory exporter."""
    exporter = InMemorySpanExporter()
    tracing.start(SimpleSpanProcessor(exporter))
    try:
        with start_server(embedded_settings) as running:
            yield running, exporter
    finally:
        tracing.shutdown()


def of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [
        s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id
    ]


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_a_predict_continues_the_callers_trace_with_a_span_per_step(
    traced: tuple[PredictionServer, InMemorySpanExporter],
) -> None:
    running, exporter = traced
    header, trace_id, client_span_id = traceparent()

    with prediction_stub(running.local_address) as stub:
        response = stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), metadata=[("traceparent", header)])

    spans = of_trace(exporter, trace_id)
    server = one(spans, PREDICT)
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None and server.parent.span_id == client_span_id and server.parent.is_remote
    assert server.attributes is not None
    assert dict(server.attributes) | {"streamflow.request_id": ""} == {
        "rpc.system": "grpc",
        "rpc.service": "streamflow.serving.v1.PredictionService",
        "rpc.method": "Predict",
        "rpc.grpc.status_code": 0,
        "streamflow.request_id": "",
        "streamflow.model_version": response.prediction.model.version,
        "streamflow.users": 1,
    }
    assert server.status.status_code is StatusCode.UNSET
    # Scored alone, the call's batch is its child, and the steps are the batch's.
    batch = one(children(spans, server), "streamflow.predict_batch")
    assert batch.attributes is not None and batch.attributes["streamflow.batch_size"] == 1
    assert not batch.links
    steps = children(spans, batch)
    assert {s.name for s in steps} == STEPS
    for step in steps:
        assert step.attributes is not None
        assert step.attributes["streamflow.model_version"] == response.prediction.model.version
        assert step.attributes["streamflow.users"] == 1
    assert len(spans) == 5
    assert server.resource.attributes["service.name"] == tracing.DEFAULT_SERVICE_NAME


def test_a_batch_predicts_steps_are_children_of_its_server_span(
    traced: tuple[PredictionServer, InMemorySpanExporter],
) -> None:
    running, exporter = traced
    header, trace_id, client_span_id = traceparent()
    users = [FIRST_USER_ID, "no-such-user", FIRST_USER_ID]

    with prediction_stub(running.local_address) as stub:
        response = stub.BatchPredict(
            pb.BatchPredictRequest(user_ids=users), metadata=[("traceparent", header)]
        )

    spans = of_trace(exporter, trace_id)
    server = one(spans, BATCH_PREDICT)
    assert server.parent is not None and server.parent.span_id == client_span_id
    assert server.attributes is not None and server.attributes["streamflow.users"] == 3
    steps = {s.name: s for s in children(spans, server)}
    assert set(steps) == STEPS
    version = response.results[0].prediction.model.version
    users_of = {name: s.attributes["streamflow.users"] for name, s in steps.items() if s.attributes}
    assert users_of == {
        "streamflow.feature_read": 3,
        "streamflow.inference": 2,  # the unknown user has no features to score
        "streamflow.build_response": 3,
    }
    assert all(s.attributes and s.attributes["streamflow.model_version"] == version for s in steps.values())


def test_a_failed_call_records_its_code_and_only_server_faults_are_errors(
    traced: tuple[PredictionServer, InMemorySpanExporter],
) -> None:
    running, exporter = traced
    header, trace_id, _ = traceparent()

    with prediction_stub(running.local_address) as stub, pytest.raises(grpc.RpcError) as raised:
        stub.Predict(pb.PredictRequest(user_id="not valid!"), metadata=[("traceparent", header)])

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    server = one(of_trace(exporter, trace_id), PREDICT)
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The caller's mistake: OpenTelemetry's gRPC conventions leave a server span's status unset for it.
    assert server.status.status_code is StatusCode.UNSET


def test_a_call_without_traceparent_starts_a_trace_of_its_own(
    traced: tuple[PredictionServer, InMemorySpanExporter],
) -> None:
    running, exporter = traced
    exporter.clear()

    with prediction_stub(running.local_address) as stub:
        stub.ModelInfo(pb.ModelInfoRequest())

    (server,) = exporter.get_finished_spans()
    assert server.name == "streamflow.serving.v1.PredictionService/ModelInfo"
    assert server.parent is None


def test_coalesced_predicts_share_one_batch_span_under_the_first_linked_to_the_others(
    traced: tuple[PredictionServer, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, exporter = traced
    # A lone call on a quiet server is scored on the loop; one scoring over the budget sends lone calls to
    # the scoring thread (server/batcher.py), whose holding then piles up the calls that arrive meanwhile.
    score = running.predictor.score

    def slow(user_ids: Sequence[str], explain: bool = False) -> Any:
        time.sleep(2 * INLINE_BUDGET_S)
        return score(user_ids, explain)

    monkeypatch.setattr(running.predictor, "score", slow)
    with prediction_stub(running.local_address) as stub:
        stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=WAIT_S)
    monkeypatch.undo()
    exporter.clear()
    held = threading.Event()
    predict_pool = running.pools[0]
    predict_pool.submit(held.wait, WAIT_S)
    calls = [traceparent() for _ in range(5)]
    with prediction_stub(running.local_address) as stub:
        futures = [
            stub.Predict.future(pb.PredictRequest(user_id=FIRST_USER_ID), metadata=[("traceparent", header)])
            for header, _, _ in calls
        ]
        deadline = time.monotonic() + WAIT_S
        while running.guard.in_flight < len(calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.guard.in_flight == len(calls)
        held.set()
        for future in futures:
            future.result(timeout=WAIT_S)

    server_spans = {trace_id: one(of_trace(exporter, trace_id), PREDICT) for _, trace_id, _ in calls}
    batches = [s for s in exporter.get_finished_spans() if s.name == "streamflow.predict_batch"]
    server_ids = {s.context.span_id: trace_id for trace_id, s in server_spans.items() if s.context}
    served: list[int] = []
    for batch in batches:
        assert batch.parent is not None and batch.parent.span_id in server_ids
        linked = [link.context.span_id for link in batch.links]
        assert set(linked) <= set(server_ids)
        assert batch.attributes is not None and batch.attributes["streamflow.batch_size"] == 1 + len(linked)
        served += [batch.parent.span_id, *linked]
        assert {s.name for s in children(exporter.get_finished_spans(), batch)} == STEPS
    # Every call is served by exactly one batch. The first batch took the calls that had arrived when its
    # drain began (one, or a few that reached the loop in the same pass) and waited behind the held thread;
    # every later call piled up into the second.
    assert sorted(served) == sorted(server_ids)
    sizes = [int(str(b.attributes["streamflow.batch_size"])) for b in batches if b.attributes]
    assert len(sizes) == 2 and sum(sizes) == len(calls)


def test_with_tracing_off_nothing_is_recorded(
    embedded_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    # An SDK provider as the process-wide one: any span made anywhere, by any tracer, would land here.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    header, _, _ = traceparent()

    assert tracing.process_tracer() is None
    assert not [o for o in call_observers(embedded_settings) if isinstance(o, tracing.ServerSpans)]
    with start_server(embedded_settings) as running, prediction_stub(running.local_address) as stub:
        stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), metadata=[("traceparent", header)])
        stub.BatchPredict(
            pb.BatchPredictRequest(user_ids=[FIRST_USER_ID] * 3), metadata=[("traceparent", header)]
        )

    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("variables", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask(
    variables: dict[str, str], on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    assert tracing.enabled_by_environment() is on


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans the SDK's console exporter wrote (indented JSON objects, one after another)."""
    decoder, spans, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        span, end = decoder.raw_decode(text, at)
        spans.append(span)
        at = text.find("{", end)
    return spans


def test_forked_workers_trace_with_their_own_provider_and_flush_on_drain(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    env = serve_env(
        STREAMFLOW_HOME=str(embedded_settings.home),
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_WORKERS="2",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="streamflow-under-test",
        # The batch processor would export after 5 s; an hour means only the drain's flush can export them.
        OTEL_BSP_SCHEDULE_DELAY="3600000",
    )
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    sent: list[int] = []
    with serving_process(env, tmp_path / "serve.log") as (process, address):
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(sent) < 20:
            # A fresh channel each time: new connections are spread over the workers by the kernel.
            header, trace_id, _ = traceparent()
            with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = pb_grpc.PredictionServiceStub(channel)
                try:
                    stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), metadata=[("traceparent", header)])
                except grpc.RpcError as exc:  # a worker still loading its model: MODEL_NOT_LOADED
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                    assert time.monotonic() < deadline, "no model loaded"
                    continue
            sent.append(trace_id)
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), True)
        process.send_signal(signal.SIGTERM)
        output = process.stdout.read()

    spans = [s for s in console_spans(output) if s["name"] == PREDICT]
    traced_ids = {int(s["context"]["trace_id"], 16) for s in spans}
    assert set(sent) <= traced_ids
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"streamflow-under-test"}
    assert all(s["kind"] == "SpanKind.SERVER" for s in spans)


def test_the_access_line_carries_the_calls_trace_id(
    traced: tuple[PredictionServer, InMemorySpanExporter],
) -> None:
    running, _ = traced
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger(ACCESS_LOGGER)
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(handler)
    header, trace_id, _ = traceparent()
    try:
        with prediction_stub(running.local_address) as stub:
            stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), metadata=[("traceparent", header)])
    finally:
        access.removeHandler(handler)
        access.setLevel(level)

    (line,) = [line for line in lines if line["method"] == f"/{PREDICT}"]
    assert line["trace_id"] == f"{trace_id:032x}"
    assert line["code"] == "OK" and line["users"] == 1
