"""Properties over the wire: no input — ids, batches, raw bytes — gets UNKNOWN, an INTERNAL without a request
id, or a status a default client cannot receive (over 8 KiB of trailers).

Hypothesis draws the inputs and a real server answers them over a default Python channel. `make test` runs
2,000 examples in all; `make fuzz` runs many more (`FUZZ_EXAMPLES` per property).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamflow.server.errors import trailer_bytes
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.training.demo_data import FIRST_USER_ID

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
RECEIVABLE_BYTES = 8 * 1024
"""The metadata a default grpc core client accepts without complaint."""
METHODS = (
    "/streamflow.serving.v1.PredictionService/Predict",
    "/streamflow.serving.v1.PredictionService/BatchPredict",
    "/streamflow.serving.v1.PredictionService/ModelInfo",
    "/grpc.health.v1.Health/Check",
)


def examples(in_make_test: int) -> settings:
    return settings(
        max_examples=EXAMPLES or in_make_test,
        deadline=None,  # a shared machine: time is not a property here
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )


# Ids as callers send them: real and unknown ones, ids just inside and outside the rules, anything at all.
def ids(longest: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([FIRST_USER_ID, "9999-99999", "", "-", "_" * 64, "a" * 65]),
        st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
        st.text(max_size=80),
        st.text(min_size=60, max_size=longest),
    )


user_ids = ids(20_000)
# Batch ids stay short enough that 1,010 of them fit grpc's 4 MiB message limit, which is grpc's own answer.
batch_ids = ids(200)


@pytest.fixture(scope="module")
def channel(served_embedded: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served_embedded) as opened:  # default options: default metadata limits
        yield opened


def assert_receivable(error: grpc.RpcError) -> None:
    """The failure a caller gets is one it can act on: a known code, a decodable status within limits."""
    code = error.code()
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error
    # RESOURCE_EXHAUSTED is how a status over the client's metadata limit shows up; nothing here overloads.
    assert code is not grpc.StatusCode.RESOURCE_EXHAUSTED, error
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    assert trailer_bytes(status) < RECEIVABLE_BYTES
    assert status.details and status.details[0].type_url.endswith("google.rpc.ErrorInfo")


@examples(1000)
@given(user_id=user_ids)
def test_any_predict_id_gets_an_answer_a_caller_can_receive(channel: grpc.Channel, user_id: str) -> None:
    try:
        reply = pb_grpc.PredictionServiceStub(channel).Predict(pb.PredictRequest(user_id=user_id), timeout=60)
    except grpc.RpcError as error:
        assert_receivable(error)
    else:
        assert reply.prediction.user_id == user_id


@examples(500)
@given(batch=st.one_of(st.lists(batch_ids, max_size=40), st.lists(batch_ids, min_size=990, max_size=1010)))
def test_any_batch_gets_one_result_per_id_or_one_receivable_error(
    channel: grpc.Channel, batch: list[str]
) -> None:
    try:
        reply = pb_grpc.PredictionServiceStub(channel).BatchPredict(
            pb.BatchPredictRequest(user_ids=batch), timeout=60
        )
    except grpc.RpcError as error:
        assert_receivable(error)
    else:
        assert [r.user_id for r in reply.results] == batch
        for result in reply.results:
            if result.HasField("error"):
                assert result.error.code not in (
                    grpc.StatusCode.UNKNOWN.value[0],
                    grpc.StatusCode.INTERNAL.value[0],
                )


@examples(500)
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=2048))
def test_any_bytes_get_an_answer_or_a_receivable_error(
    channel: grpc.Channel, method: str, payload: bytes
) -> None:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=60)
    except grpc.RpcError as error:
        assert_receivable(error)
