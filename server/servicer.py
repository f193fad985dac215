"""The PredictionService servicer: protobuf in, one call to the Predictor, protobuf out.

`_answer` is the one place where failures become statuses: a `ServingError` through the error table, anything
else as INTERNAL with a request id whose traceback only the server log sees.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TypeVar

import grpc
from grpc_status import rpc_status

from client.generated.streamflow.serving.v1 import prediction_service_pb2 as pb
from client.generated.streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from server import converters
from server.errors import ServingError, internal_status, status_of
from server.predictor import Predictor

log = logging.getLogger(__name__)

Response = TypeVar("Response")


def _answer(context: grpc.ServicerContext, rpc: str, work: Callable[[], Response]) -> Response:
    try:
        return work()
    except ServingError as exc:
        status = status_of(exc)
    except Exception:
        request_id = uuid.uuid4().hex
        log.exception("%s failed unexpectedly (request id %s)", rpc, request_id)
        status = internal_status(request_id)
    # Outside the except blocks: abort raises, and must not be caught as an unexpected failure.
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover - grpc always raises


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    """Serves `streamflow.serving.v1.PredictionService` over an injected Predictor."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        return _answer(
            context,
            "Predict",
            lambda: pb.PredictResponse(
                prediction=converters.prediction(self._predictor.predict(request.user_id))
            ),
        )

    def BatchPredict(
        self, request: pb.BatchPredictRequest, context: grpc.ServicerContext
    ) -> pb.BatchPredictResponse:
        def work() -> pb.BatchPredictResponse:
            user_ids = list(request.user_ids)
            results = self._predictor.batch_predict(user_ids)
            return pb.BatchPredictResponse(
                results=[converters.batch_result(u, r) for u, r in zip(user_ids, results, strict=True)]
            )

        return _answer(context, "BatchPredict", work)

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        return _answer(context, "ModelInfo", lambda: converters.model_info(self._predictor.model_info()))
