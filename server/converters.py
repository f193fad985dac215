"""Domain types -> protobuf messages of `streamflow.serving.v1` (requests are plain strings, read as is)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime

from google.protobuf import timestamp_pb2

from streamflow.server.domain import (
    FeatureSchema,
    FeatureType,
    FeatureValue,
    ModelInfo,
    ModelRef,
    Prediction,
    ReloadFailure,
    Runtime,
)
from streamflow.server.errors import FeatureError, status_of
from streamflow.server.shadow import ShadowReport
from streamflow.serving.v1 import prediction_service_pb2 as pb

_FEATURE_TYPES = {
    FeatureType.INT64: pb.FEATURE_TYPE_INT64,
    FeatureType.DOUBLE: pb.FEATURE_TYPE_DOUBLE,
    FeatureType.BOOL: pb.FEATURE_TYPE_BOOL,
    FeatureType.STRING: pb.FEATURE_TYPE_STRING,
}
_RUNTIMES = {
    Runtime.SKLEARN: pb.RUNTIME_SKLEARN,
    Runtime.ONNX: pb.RUNTIME_ONNX,
    Runtime.FOREST: pb.RUNTIME_FOREST,
}


@functools.lru_cache(maxsize=256)
def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime. Cached: a batch's features share a few snapshot times, and
    converting each of its 14,000 values took a third of a 1,000-user BatchPredict. Callers only copy it."""
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message


def model_ref(ref: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(name=ref.name, version=ref.version)


# Exact types, so a bool (an int in Python) lands in bool_value.
_VALUE_FIELDS = {bool: "bool_value", int: "int64_value", float: "double_value", str: "string_value"}

# A prediction's features and model are merged in as bytes encoded once per distinct value: a batch's users
# share most of theirs (snapshot times, categories, small counts), and building 14 FeatureValue messages per
# user took most of a 1,000-user BatchPredict's conversion. Predictions are filled in place (`add()`,
# sub-message fields): a message given to a constructor or a repeated field is deep-copied.


@functools.lru_cache(maxsize=1 << 16)
def _feature_bytes(field: str, value: FeatureValue) -> bytes:
    """`value` encoded as one entry of `Prediction.features`, its value in `field`, which is part of the key
    because 1, 1.0 and True are equal (so the first of 0.0 and -0.0, the same number, stands for both)."""
    holder = pb.Prediction()
    feature = holder.features.add(name=value.name, **{field: value.value})
    feature.event_time.CopyFrom(timestamp(value.event_time))
    return holder.SerializeToString()


@functools.lru_cache(maxsize=16)
def _model_bytes(ref: ModelRef) -> bytes:
    """`ref` encoded as `Prediction.model`."""
    return pb.Prediction(model=model_ref(ref)).SerializeToString()


def _fill_prediction(message: pb.Prediction, result: Prediction) -> None:
    features = [_feature_bytes(_VALUE_FIELDS[type(v.value)], v) for v in result.features]
    message.MergeFromString(_model_bytes(result.model) + b"".join(features))
    message.user_id = result.user_id
    message.label = pb.CHURN_LABEL_CHURN if result.churn else pb.CHURN_LABEL_STAY
    message.churn_probability = result.churn_probability
    if result.contributions:  # only asked for with `explain`
        add = message.contributions.add
        for name, contribution in result.contributions:
            add(name=name, contribution=contribution)


def prediction(result: Prediction) -> pb.Prediction:
    message = pb.Prediction()
    _fill_prediction(message, result)
    return message


def predict_response(result: Prediction) -> pb.PredictResponse:
    response = pb.PredictResponse()
    _fill_prediction(response.prediction, result)
    return response


def batch_response(
    user_ids: Sequence[str], results: Sequence[Prediction | FeatureError]
) -> pb.BatchPredictResponse:
    """One entry per requested id, in order: the prediction, or the status Predict would have failed with."""
    response = pb.BatchPredictResponse()
    add_result = response.results.add
    for user_id, result in zip(user_ids, results, strict=True):
        entry = add_result(user_id=user_id)
        if isinstance(result, FeatureError):
            entry.error.CopyFrom(status_of(result))
        else:
            _fill_prediction(entry.prediction, result)
    return response


def feature_schema(feature: FeatureSchema) -> pb.FeatureSchema:
    return pb.FeatureSchema(
        name=feature.name, type=_FEATURE_TYPES[feature.type], feature_view=feature.feature_view
    )


def model_info(info: ModelInfo) -> pb.ModelInfoResponse:
    response = pb.ModelInfoResponse(
        model=model_ref(info.model),
        stage=info.stage,
        aliases=info.aliases,
        run_id=info.run_id,
        model_uri=info.model_uri,
        training_as_of=info.training_as_of,
        feature_service=info.feature_service,
        features=[feature_schema(f) for f in info.features],
        metrics=info.metrics,
        loaded_at=timestamp(info.loaded_at),
        runtime=_RUNTIMES[info.runtime],
    )
    if info.base_value is not None:
        response.base_value = info.base_value
    if info.last_reload_failure is not None:
        response.last_reload_failure.CopyFrom(reload_failure(info.last_reload_failure))
    if info.shadow is not None:
        response.shadow.CopyFrom(shadow_report(info.shadow))
    return response


def shadow_report(report: ShadowReport) -> pb.ShadowReport:
    message = pb.ShadowReport(
        model_uri=report.model_uri,
        sample=report.sample,
        users_dropped=report.totals.dropped,
        comparisons=[
            pb.ShadowComparison(
                shadow_version=shadow_version,
                production_version=production_version,
                users_compared=tally.users,
                label_agreement=tally.label_agreement,
                mean_abs_delta=tally.mean_abs_delta,
                p99_abs_delta=tally.p99_abs_delta,
            )
            for (shadow_version, production_version), tally in sorted(report.totals.tallies.items())
        ],
    )
    if report.model is not None:
        message.model.CopyFrom(model_ref(report.model))
    if report.last_reload_failure is not None:
        message.last_reload_failure.CopyFrom(reload_failure(report.last_reload_failure))
    return message


def reload_failure(failure: ReloadFailure) -> pb.ReloadFailure:
    return pb.ReloadFailure(
        model_version=failure.model_version, reason=failure.reason, failed_at=timestamp(failure.failed_at)
    )
