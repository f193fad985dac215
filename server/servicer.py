"""The PredictionService servicer: protobuf in, one call to the Predictor, protobuf out.

It runs on the asyncio server's event loop (server/app.py). Predict goes through the `PredictBatcher`, which
scores concurrent calls together on its own thread; BatchPredict runs on the injected thread pool, so the loop
keeps answering while a large batch is scored; ModelInfo answers right on the loop.

`_answer` is the one place where failures become statuses: a `ServingError` through the error table, anything
else as INTERNAL with a request id whose traceback only the server log sees.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

import grpc
from grpc_status import rpc_status

from client.generated.streamflow.serving.v1 import prediction_service_pb2 as pb
from client.generated.streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from server import converters
from server.batcher import PredictBatcher
from server.errors import FeatureError, ServingError, internal_status, status_of
from server.predictor import Predictor

log = logging.getLogger(__name__)

Response = TypeVar("Response")


async def _answer(context: grpc.aio.ServicerContext, rpc: str, work: Awaitable[Response]) -> Response:
    """The response `work` gives, or the status it fails with."""
    try:
        return await work
    except ServingError as exc:
        status = status_of(exc)
    except Exception:
        request_id = uuid.uuid4().hex
        log.exception("%s failed unexpectedly (request id %s)", rpc, request_id)
        status = internal_status(request_id)
    # Outside the except blocks: abort raises, and must not be caught as an unexpected failure.
    grpc_status = rpc_status.to_status(status)
    await context.abort(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    """Serves `streamflow.serving.v1.PredictionService` over an injected Predictor."""

    def __init__(
        self, predictor: Predictor, predict_pool: Executor, batch_pool: Executor, max_batch_size: int
    ) -> None:
        self._predictor = predictor
        self._batcher = PredictBatcher(self._predict_responses, predict_pool, max_batch_size)
        self._batch_pool = batch_pool

    def _predict_responses(self, user_ids: Sequence[str]) -> list[pb.PredictResponse | FeatureError]:
        return [
            result if isinstance(result, FeatureError) else converters.predict_response(result)
            for result in self._predictor.score(user_ids)
        ]

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        return await _answer(context, "Predict", self._batcher.predict(request.user_id))

    async def BatchPredict(
        self, request: pb.BatchPredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchPredictResponse:
        def work() -> pb.BatchPredictResponse:
            user_ids = list(request.user_ids)
            return converters.batch_response(user_ids, self._predictor.batch_predict(user_ids))

        scored = asyncio.get_running_loop().run_in_executor(self._batch_pool, work)
        return await _answer(context, "BatchPredict", scored)

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        async def work() -> pb.ModelInfoResponse:
            return converters.model_info(self._predictor.model_info())

        return await _answer(context, "ModelInfo", work())
