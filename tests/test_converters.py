"""Predictions become exactly the messages their fields describe, though features are merged in as bytes
encoded once per distinct value (server/converters.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from streamflow.server import converters
from streamflow.server.domain import FeatureValue, ModelRef, Prediction
from streamflow.server.errors import EntityNotFound, FeatureProblem, status_of
from streamflow.serving.v1 import prediction_service_pb2 as pb

SNAPSHOT = datetime(2024, 1, 31, tzinfo=UTC)
LATER = SNAPSHOT + timedelta(days=3, microseconds=250)
MODEL = ModelRef("streamflow_churn", "7")


def stamp(moment: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(moment)
    return message


def prediction(user_id: str, churn: bool, features: tuple[FeatureValue, ...]) -> Prediction:
    return Prediction(user_id, churn, 0.75 if churn else 0.25, MODEL, features)


# Equal values of different types under one name (1, 1.0 and True are equal and hash alike), each type of
# value, two event times, a negative and a large int, an empty and a non-ASCII string.
FIRST = prediction(
    "user-1",
    True,
    (
        FeatureValue("flag", 1, SNAPSHOT),
        FeatureValue("count", -3, SNAPSHOT),
        FeatureValue("fee", 70.35, LATER),
        FeatureValue("plan", "Fiber optic", SNAPSHOT),
    ),
)
SECOND = prediction(
    "user-2",
    False,
    (
        FeatureValue("flag", True, SNAPSHOT),
        FeatureValue("count", 2**62, LATER),
        FeatureValue("fee", 1.0, SNAPSHOT),
        FeatureValue("plan", "", SNAPSHOT),
        FeatureValue("city", "Zürich", LATER),
    ),
)
THIRD = prediction("user-3", False, (FeatureValue("flag", 1.0, SNAPSHOT),))


def expected(result: Prediction, values: list[dict[str, Any]]) -> pb.Prediction:
    return pb.Prediction(
        user_id=result.user_id,
        label=pb.CHURN_LABEL_CHURN if result.churn else pb.CHURN_LABEL_STAY,
        churn_probability=result.churn_probability,
        model=pb.ModelRef(name=MODEL.name, version=MODEL.version),
        features=[
            pb.FeatureValue(name=v.name, event_time=stamp(v.event_time), **fields)
            for v, fields in zip(result.features, values, strict=True)
        ],
    )


EXPECTED = {
    "user-1": expected(
        FIRST,
        [{"int64_value": 1}, {"int64_value": -3}, {"double_value": 70.35}, {"string_value": "Fiber optic"}],
    ),
    "user-2": expected(
        SECOND,
        [
            {"bool_value": True},
            {"int64_value": 2**62},
            {"double_value": 1.0},
            {"string_value": ""},
            {"string_value": "Zürich"},
        ],
    ),
    "user-3": expected(THIRD, [{"double_value": 1.0}]),
}


def test_a_predict_response_holds_exactly_its_predictions_fields() -> None:
    for result in (FIRST, SECOND, THIRD, FIRST):  # FIRST again: from the cache this time
        response = converters.predict_response(result)

        assert response == pb.PredictResponse(prediction=EXPECTED[result.user_id])
        assert (
            response.SerializeToString()
            == pb.PredictResponse(prediction=EXPECTED[result.user_id]).SerializeToString()
        )


def test_a_batch_response_keeps_order_and_each_users_own_features_or_error() -> None:
    unknown = EntityNotFound("nobody", [FeatureProblem("fee", "billing", "has no value")])
    ids = ["user-2", "nobody", "user-1", "user-3"]

    response = converters.batch_response(ids, [SECOND, unknown, FIRST, THIRD])

    assert response == pb.BatchPredictResponse(
        results=[
            pb.BatchPredictResult(user_id="user-2", prediction=EXPECTED["user-2"]),
            pb.BatchPredictResult(user_id="nobody", error=status_of(unknown)),
            pb.BatchPredictResult(user_id="user-1", prediction=EXPECTED["user-1"]),
            pb.BatchPredictResult(user_id="user-3", prediction=EXPECTED["user-3"]),
        ]
    )
