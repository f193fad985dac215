"""Faults at the wire, as a caller with a default channel meets them: inputs at their worst case, bytes that
do not decode, floods, an error table with a hole in it, and a drain that must not drop received calls.

Every call goes through a real server on a free port and a default Python channel, whose metadata limits are
what a too-large status would break (grpc core: a soft limit of 8 KiB, a hard one of 16 KiB).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import pkgutil
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import streamflow.server
from streamflow.server import errors
from streamflow.server.app import PredictionServer
from streamflow.server.domain import ModelInfo
from streamflow.server.errors import ERROR_TABLE, MAX_FIELD_VIOLATIONS, ServingError, row_of, trailer_bytes
from streamflow.server.health import NOT_SERVING, SERVING, HealthService
from streamflow.server.model_watcher import ModelWatcher
from streamflow.server.predictor import Predictor
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.serving import WireError, server_settings, start_server, wire_error

GRPC_SOFT_METADATA_LIMIT = 8 * 1024
PREDICT = "/streamflow.serving.v1.PredictionService/Predict"
BATCH_PREDICT = "/streamflow.serving.v1.PredictionService/BatchPredict"
MODEL_INFO = "/streamflow.serving.v1.PredictionService/ModelInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def raw_call(
    channel: grpc.Channel, method: str, payload: bytes, timeout: float = 30
) -> grpc.RpcError | bytes:
    """Send `payload` as is to `method`; the reply's bytes, or the error."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        reply: bytes = call(payload, timeout=timeout)
    except grpc.RpcError as exc:
        return exc
    return reply


def status_of_call(error: grpc.RpcError) -> status_pb2.Status:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status: {error!r}"
    return status


# --- item 3: every error status fits a default client's metadata limits ---------------------------------

WORST_USER_IDS = {
    "6,000 characters": "x" * 6_000,
    "1,000,000 two-byte characters": "é" * 1_000_000,
    "100,000 percent signs": "%" * 100_000,
    "control characters": "\x00\n\t" * 20_000,
    "emoji": "😀" * 200_000,
}


@pytest.mark.parametrize("user_id", WORST_USER_IDS.values(), ids=WORST_USER_IDS.keys())
def test_a_huge_user_id_is_invalid_argument_with_its_details_intact(
    served_embedded: str, user_id: str
) -> None:
    with grpc.insecure_channel(served_embedded) as channel, pytest.raises(grpc.RpcError) as failure:
        pb_grpc.PredictionServiceStub(channel).Predict(pb.PredictRequest(user_id=user_id), timeout=30)

    error = wire_error(failure.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_USER_ID"
    assert set(error.info.metadata) == {"userId", "problem"}
    assert error.info.metadata["userId"].endswith(f"... ({len(user_id)} characters)")
    assert error.violated_fields == ["user_id"]
    assert trailer_bytes(error.status) < GRPC_SOFT_METADATA_LIMIT


WORST_BATCHES = {
    "1,000 empty ids": [""] * 1_000,
    "100,000 empty ids": [""] * 100_000,
    "30,000 ids of 100 characters": ["y" * 100] * 30_000,
    "1,001 ids of 60 non-ASCII characters": ["ü" * 60] * 1_001,
}


@pytest.mark.parametrize("user_ids", WORST_BATCHES.values(), ids=WORST_BATCHES.keys())
def test_a_huge_invalid_batch_is_one_invalid_argument_that_counts_every_violation(
    served_embedded: str, user_ids: list[str]
) -> None:
    with grpc.insecure_channel(served_embedded) as channel, pytest.raises(grpc.RpcError) as failure:
        pb_grpc.PredictionServiceStub(channel).BatchPredict(
            pb.BatchPredictRequest(user_ids=user_ids), timeout=60
        )

    error = wire_error(failure.value)
    too_many = len(user_ids) > 1000
    malformed = sum(1 for user_id in user_ids if not (1 <= len(user_id) <= 64 and user_id.isascii()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_BATCH"
    assert dict(error.info.metadata) == {
        "batchSize": str(len(user_ids)),
        "maxBatchSize": "1000",
        "violations": str(malformed + too_many),
    }
    assert len(error.violated_fields) == MAX_FIELD_VIOLATIONS
    assert error.violated_fields[0] == ("user_ids" if too_many else "user_ids[0]")
    assert trailer_bytes(error.status) < GRPC_SOFT_METADATA_LIMIT


def test_a_status_too_large_for_the_trailers_is_cut_keeping_code_message_and_error_info() -> None:
    huge = errors.InvalidBatch(
        [errors.FieldViolation(f"user_ids[{i}]", "d" * 500) for i in range(MAX_FIELD_VIOLATIONS)], 10**6, 1000
    )
    status = errors.status_of(huge)
    assert trailer_bytes(status) > errors.MAX_STATUS_BYTES

    cut = errors.bounded(status)

    assert trailer_bytes(cut) <= errors.MAX_STATUS_BYTES
    assert cut.code == status.code
    assert cut.message == status.message[:1000] + "..."
    assert WireError.of(cut).info.reason == "INVALID_BATCH"
    assert len(cut.details) < len(status.details)


# --- item 6: bytes that do not decode ------------------------------------------------------------------

UNDECODABLE = {
    "invalid UTF-8 in user_id": b"\x0a\x02\xff\xfe",
    "random bytes": b"\xff\xff\xff\xff\xff\xff\xff\xff",
    "truncated field": b"\x0a\x10abc",
}


UNDECODABLE_CASES = [
    pytest.param(method, payload, id=f"{method.rsplit('/', 1)[-1]}: {name}")
    for method in (PREDICT, BATCH_PREDICT, MODEL_INFO, HEALTH_CHECK)
    for name, payload in UNDECODABLE.items()
    # ModelInfoRequest has no field 1: those bytes decode as an unknown field, which protobuf keeps.
    if not (method == MODEL_INFO and name == "invalid UTF-8 in user_id")
]


@pytest.mark.parametrize(("method", "payload"), UNDECODABLE_CASES)
def test_undecodable_bytes_are_invalid_argument_without_internals(
    served_embedded: str, method: str, payload: bytes
) -> None:
    with grpc.insecure_channel(served_embedded) as channel:
        error = raw_call(channel, method, payload)

    assert isinstance(error, grpc.RpcError)
    decoded = WireError.of(status_of_call(error))
    assert decoded.code == grpc.StatusCode.INVALID_ARGUMENT
    assert decoded.info.reason == "MALFORMED_REQUEST"
    assert dict(decoded.info.metadata) == {"method": method, "requestBytes": str(len(payload))}
    for internal in ("DecodeError", "class", "Traceback", "protobuf"):
        assert internal not in decoded.status.message


def test_a_flood_of_undecodable_requests_is_logged_once_and_counted(
    embedded_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO),
        start_server(embedded_settings) as running,
        grpc.insecure_channel(running.local_address) as channel,
    ):
        codes = Counter(
            error.code()
            if isinstance(error := raw_call(channel, PREDICT, b"\xff" * 8), grpc.RpcError)
            else "OK"
            for _ in range(500)
        )
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]

    assert codes == {grpc.StatusCode.INVALID_ARGUMENT: 500}
    assert len(lines) == 1 and not lines[0].exc_info
    assert not [r for r in caplog.records if r.exc_info]  # no traceback at all


# --- items 5 and 7: a flood gets RESOURCE_EXHAUSTED, never CANCELLED, and health always answers ---------


def test_a_flood_is_answered_ok_or_overloaded_while_every_health_probe_answers_serving(
    embedded_settings: Settings,
) -> None:
    request = pb.BatchPredictRequest(user_ids=[FIRST_USER_ID] * 200)
    probes: list[tuple[int, float]] = []
    stop_probing = threading.Event()

    def probe(address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not stop_probing.is_set():
                started = time.perf_counter()
                # A liveness bound, not a latency target: the latency is printed and measured by make bench.
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5.0)
                probes.append((reply.status, time.perf_counter() - started))
                time.sleep(0.01)

    with (
        start_server(embedded_settings, max_concurrent_rpcs=8, threads=2) as running,
        grpc.insecure_channel(running.local_address) as channel,
        ThreadPoolExecutor(max_workers=1) as prober,
    ):
        probing = prober.submit(probe, running.local_address)
        stub = pb_grpc.PredictionServiceStub(channel)
        flood = [stub.BatchPredict.future(request, timeout=120) for _ in range(600)]
        flood += [
            stub.Predict.future(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=120) for _ in range(2000)
        ]
        codes = Counter(call.code() for call in flood)
        stop_probing.set()
        probing.result()
        overloaded = [wire_error(call.exception()) for call in flood if call.code() != grpc.StatusCode.OK]

    latencies = sorted(seconds for _, seconds in probes)
    print(
        f"flood: {len(flood)} calls, codes {dict(codes)}; {len(probes)} health probes, "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0, "the flood never exceeded the limit"
    assert {(e.info.reason, e.retry is not None) for e in overloaded} == {("OVERLOADED", True)}
    assert probes and {status for status, _ in probes} == {health_pb2.HealthCheckResponse.SERVING}


# --- item 11: the error table has a row for every ServingError ------------------------------------------


def _all_subclasses(cls: type[ServingError]) -> Iterator[type[ServingError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_serving_error_resolves_to_a_row_of_the_error_table() -> None:
    # Every server module is imported, so an error class defined anywhere in the server is walked.
    for module in pkgutil.iter_modules(streamflow.server.__path__):
        importlib.import_module(f"streamflow.server.{module.name}")
    leaves = [
        cls
        for cls in _all_subclasses(ServingError)
        if not cls.__subclasses__() and cls.__module__.startswith("streamflow.server.")
    ]

    assert len(leaves) >= len(ERROR_TABLE)
    missing = [cls.__name__ for cls in leaves if not inspect.isabstract(cls) and row_of(cls) is None]
    assert missing == []


def test_an_error_without_a_row_is_internal_with_a_request_id_not_unknown(
    embedded_settings: Settings,
) -> None:
    class Unmapped(ServingError):
        """A new error whose author forgot the table."""

    class UnmappedPredictor(Predictor):  # a stand-in: only a new, unmapped error class can produce this case
        def model_info(self) -> ModelInfo:
            raise Unmapped("forgot the table", {"secret": "value"})

    settings = server_settings(embedded_settings)
    with (
        start_server(
            embedded_settings, predictor=UnmappedPredictor(settings, ModelWatcher(settings))
        ) as running,
        grpc.insecure_channel(running.local_address) as channel,
        pytest.raises(grpc.RpcError) as failure,
    ):
        pb_grpc.PredictionServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30)

    error = wire_error(failure.value)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.info.reason == "INTERNAL_ERROR"
    assert set(error.info.metadata) == {"requestId"}
    assert "forgot" not in error.status.message


# --- item 12: a drain completes every call the server has received ---------------------------------------


def _hold_event_loop(running: PredictionServer, seconds: float) -> None:
    """Block the server's event loop, as batch threads holding the GIL do under load: calls that arrive
    meanwhile are received by grpc but not dispatched to a handler."""
    running.event_loop.loop.call_soon_threadsafe(time.sleep, seconds)


def test_calls_received_but_not_yet_dispatched_when_the_drain_starts_all_complete(
    embedded_settings: Settings,
) -> None:
    request = pb.BatchPredictRequest(user_ids=[FIRST_USER_ID] * 200)
    with start_server(embedded_settings) as running, grpc.insecure_channel(running.local_address) as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=30)  # connected
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        _hold_event_loop(running, 1.5)
        calls = [stub.BatchPredict.future(request, timeout=60) for _ in range(8)]
        time.sleep(0.5)  # the calls reach the server while its loop is held
        stopping = threading.Thread(target=running.stop, args=(30.0,))
        stopping.start()
        results = [call.exception() or call.result() for call in calls]
        after_drain = list(watch)  # ends by itself once the drain starts, not at the end of the grace
        stopping.join(timeout=60)

    assert [type(r).__name__ for r in results] == ["BatchPredictResponse"] * 8, results
    assert all(len(r.results) == 200 for r in results)
    assert [u.status for u in after_drain] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert watch.code() == grpc.StatusCode.OK
    assert not stopping.is_alive()


def test_a_drain_that_starts_while_a_watch_writes_still_sends_the_watcher_not_serving() -> None:
    """The wire test below failed once: the drain started while a Watch was writing SERVING, and the stream
    ended after it without NOT_SERVING. Here the drain starts inside that write, every time."""
    health = HealthService([""])
    health.set(SERVING)
    written: list[int] = []

    class WritingContext:
        async def write(self, response: health_pb2.HealthCheckResponse) -> None:
            written.append(response.status)
            if len(written) == 1:
                health.start_drain()
            await asyncio.sleep(0)

    async def watch() -> None:
        await asyncio.wait_for(health.Watch(health_pb2.HealthCheckRequest(), WritingContext()), 10)  # type: ignore[arg-type]

    asyncio.run(watch())
    assert written == [SERVING, NOT_SERVING]


def test_during_the_drain_delay_health_says_not_serving_and_calls_still_succeed(
    embedded_settings: Settings,
) -> None:
    with (
        start_server(embedded_settings, drain_delay_s=5.0) as running,
        grpc.insecure_channel(running.local_address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = threading.Thread(target=running.stop, args=(30.0,))
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        checked = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        reply = pb_grpc.PredictionServiceStub(channel).Predict(
            pb.PredictRequest(user_id=FIRST_USER_ID), timeout=10
        )
        stopping.join(timeout=60)

    assert checked == health_pb2.HealthCheckResponse.NOT_SERVING
    assert reply.prediction.user_id == FIRST_USER_ID
