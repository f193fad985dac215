"""The PredictionService servicer: protobuf in, one call to the Predictor, protobuf out.

It runs on the asyncio server's event loop (server/app.py), behind the call guard (server/rpc.py), which
decodes requests, admits calls and turns what a method raises into a status. Predict goes through the
`PredictBatcher`, which scores concurrent calls together on its own thread (a lone call on a quiet server
right on the loop); BatchPredict runs on the injected thread pool, so the loop keeps answering while a large
batch is scored; ModelInfo answers right on the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from concurrent.futures import Executor

import grpc
from google.protobuf.message import Message

from streamflow.server import converters, tracing
from streamflow.server.batcher import PredictBatcher
from streamflow.server.domain import Prediction
from streamflow.server.errors import FeatureError
from streamflow.server.prediction_log import AwaitingShadow, PredictionLog
from streamflow.server.predictor import Predictor, check_user_id
from streamflow.server.rpc import CURRENT_CALL
from streamflow.serving.v1 import prediction_service_pb2 as pb

Answered = tuple[pb.PredictResponse, AwaitingShadow | None]
"""A Predict's response and where its log record goes when the shadow also scores the user."""


class PredictionServicer:
    """Serves `streamflow.serving.v1.PredictionService` over an injected Predictor."""

    def __init__(
        self,
        predictor: Predictor,
        predict_pool: Executor,
        batch_pool: Executor,
        max_batch_size: int,
        prediction_log: PredictionLog | None = None,
    ) -> None:
        self._predictor = predictor
        self._log = prediction_log  # each prediction served goes there (server/prediction_log.py)
        self._batcher = PredictBatcher(self._predict_responses, predict_pool, max_batch_size)
        self._batch_pool = batch_pool

    def _predict_responses(
        self, user_ids: Sequence[str], explain: bool = False
    ) -> list[Answered | FeatureError]:
        results = self._predictor.score(user_ids, explain)
        with tracing.span("streamflow.build_response", _version_of(results), len(results)):
            return [
                result
                if isinstance(result, FeatureError)
                else (converters.predict_response(result), result.shadow)
                for result in results
            ]

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        call = CURRENT_CALL.get()
        call.users = 1
        if request.explain:
            response, awaiting = await self._explained_predict(request.user_id)
        else:
            response, awaiting = await self._batcher.predict(request.user_id)
        call.model_version = response.prediction.model.version
        if self._log is not None:
            self._log.served(call.request_id, (response.prediction.SerializeToString(),), (awaiting,))
        return response

    async def _explained_predict(self, user_id: str) -> Answered:
        """One user scored and explained on the batch pool: an explanation takes milliseconds, too long for
        the event loop, and coalescing it would make the Predicts batched with it wait for it."""

        def work() -> Answered:
            (answer,) = self._predict_responses([user_id], explain=True)
            if isinstance(answer, FeatureError):
                raise answer
            return answer

        check_user_id(user_id)
        return await asyncio.get_running_loop().run_in_executor(
            self._batch_pool, contextvars.copy_context().run, work
        )

    async def BatchPredict(
        self, request: pb.BatchPredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchPredictResponse:
        def work() -> pb.BatchPredictResponse:
            user_ids = list(request.user_ids)
            results = self._predictor.batch_predict(user_ids, request.explain)
            with tracing.span("streamflow.build_response", _version_of(results), len(results)):
                response = converters.batch_response(user_ids, results)
            if self._log is not None:  # on the pool's thread, off the event loop
                served = [
                    r.prediction.SerializeToString() for r in response.results if r.HasField("prediction")
                ]
                awaiting = (
                    [r.shadow for r in results if isinstance(r, Prediction)]
                    if self._predictor.shadow is not None
                    else ()
                )
                self._log.served(call.request_id, served, awaiting)
            return response

        call = CURRENT_CALL.get()
        call.users = len(request.user_ids)
        # The caller's context (its trace, its call) goes with the work to the pool's thread.
        response = await asyncio.get_running_loop().run_in_executor(
            self._batch_pool, contextvars.copy_context().run, work
        )
        call.model_version = next(
            (r.prediction.model.version for r in response.results if r.HasField("prediction")), ""
        )
        return response

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        response = converters.model_info(self._predictor.model_info())
        CURRENT_CALL.get().model_version = response.model.version
        return response


def _version_of(results: Sequence[Prediction | FeatureError]) -> str:
    """The model version that scored `results` ("" when none was scored)."""
    return next((r.model.version for r in results if isinstance(r, Prediction)), "")


def users_requested(request: Message) -> int:
    """What a call costs against its caller's quota: the users it asks to score, at least 1 (ModelInfo, an
    empty batch), so that no call is free."""
    if isinstance(request, pb.BatchPredictRequest):
        return max(1, len(request.user_ids))
    return 1
