"""Training/serving skew: what the server reads and predicts equals what the pipeline predicts on the offline
feature rows of the latest snapshot (Feast's point-in-time training set), user by user."""

from __future__ import annotations

from datetime import date

import mlflow.sklearn
import numpy as np

from streamflow.feature_repo.definitions import FEATURE_NAMES, SNAPSHOT_DATES
from streamflow.model_contract import PROBABILITY_TOLERANCE
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.dataset import training_set
from streamflow.training.train import mlflow_client
from tests.fixtures.serving import prediction_stub

SAMPLE = 80


def test_served_predictions_equal_the_pipeline_on_the_offline_rows(
    embedded_settings: Settings, served_embedded: str
) -> None:
    latest: date = SNAPSHOT_DATES[-1]
    offline = training_set(embedded_settings, latest)
    sample = offline.sample(n=SAMPLE, random_state=embedded_settings.seed).reset_index(drop=True)
    mlflow_client(embedded_settings)  # points MLflow's loader at this home's registry
    pipeline = mlflow.sklearn.load_model(f"models:/{embedded_settings.model_name}/1")
    expected = pipeline.predict_proba(sample[list(FEATURE_NAMES)])[:, 1]

    with prediction_stub(served_embedded) as stub:
        runtime = stub.ModelInfo(pb.ModelInfoRequest()).runtime
        served = stub.BatchPredict(pb.BatchPredictRequest(user_ids=list(sample["user_id"]))).results

    assert [r.user_id for r in served] == list(sample["user_id"])
    assert all(r.HasField("prediction") for r in served), [
        r.error.message for r in served if r.HasField("error")
    ]
    for result, (_, row) in zip(served, sample.iterrows(), strict=True):
        values = {f.name: getattr(f, f.WhichOneof("value")) for f in result.prediction.features}
        assert values == {name: row[name] for name in FEATURE_NAMES}, result.user_id
    probabilities = np.array([r.prediction.churn_probability for r in served])
    # The pipeline and the forest kernel answer within float rounding; the ONNX export within the parity
    # tolerance.
    tolerance = PROBABILITY_TOLERANCE if runtime == pb.RUNTIME_ONNX else 1e-12
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=tolerance)
    churn = [r.prediction.label == pb.CHURN_LABEL_CHURN for r in served]
    assert churn == list(expected > 0.5)
