"""Per-prediction explanations (issue 14): exact TreeSHAP over the model's raw features.

The kernel is checked against an independent brute-force Shapley computation (every coalition of a small
forest's raw features, each valued by the path-dependent expectation TreeSHAP defines); the served
explanations through real servers and default clients: additivity with ModelInfo's base value, ranking,
unchanged answers without `explain`, a full-size explained batch within a default client's 4 MB, the ONNX
and scikit-learn runtimes, a multi-process server whose workers map the explainer from the artifact, and
EXPLANATIONS_UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import itertools
import json
import math
import pickle
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier

from streamflow.client import ChurnClient
from streamflow.feature_repo.definitions import JOIN_KEY, SNAPSHOT_DATES, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.feature_repo.store import open_store
from streamflow.server import native
from streamflow.server.app import PredictionServer
from streamflow.server.domain import Runtime
from streamflow.server.explanations import Explainer, forest_arrays
from streamflow.server.loaded_model import LoadedModel, ModelSource
from streamflow.server.model_loader import ModelTarget, load_model
from streamflow.server.predictor import Predictor
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.dataset import LABEL
from streamflow.training.demo_data import table_path
from streamflow.training.train import build_pipeline, feature_kinds, mlflow_client, validation_frame
from tests.fixtures.serving import prediction_stub, start_server, wire_error

ADDITIVITY = 1e-6


def _active_users(settings: Settings, count: int) -> list[str]:
    """`count` users of the last snapshot (every one scoreable), in id order."""
    table = pd.read_parquet(table_path(settings, VIEW_SPECS[0].table))
    last = table.loc[table[TIMESTAMP_FIELD].dt.date == SNAPSHOT_DATES[-1], JOIN_KEY]
    return sorted(last)[:count]


def _contributions(prediction: pb.Prediction) -> dict[str, float]:
    return {c.name: c.contribution for c in prediction.contributions}


# --- the kernel against brute force -------------------------------------------------------------------


def _path_dependent_value(tree: Any, row: np.ndarray, raw_of_column: list[int], known: set[int]) -> float:
    """TreeSHAP's value of a coalition for one tree: follow the row where the node's raw feature is known,
    else average both children by the training users they hold."""
    t = tree.tree_

    def value(node: int) -> float:
        left, right = t.children_left[node], t.children_right[node]
        if left < 0:
            counts = t.value[node, 0]
            return float(counts[1] / counts.sum())
        column = t.feature[node]
        if raw_of_column[column] in known:
            return value(left if row[column] <= t.threshold[node] else right)
        cover = t.weighted_n_node_samples
        return float((cover[left] * value(left) + cover[right] * value(right)) / cover[node])

    return value(0)


def _brute_force_shapley(pipeline: Any, frame: pd.DataFrame, raw_of_column: list[int]) -> np.ndarray:
    """Exact Shapley values of the raw features by enumerating every coalition."""
    row = pipeline[0].transform(frame).astype(np.float32)[0]  # the trees compare float32
    players = len(frame.columns)
    forest = pipeline[-1].estimators_
    worth = {
        frozenset(coalition): np.mean(
            [_path_dependent_value(t, row, raw_of_column, set(coalition)) for t in forest]
        )
        for size in range(players + 1)
        for coalition in itertools.combinations(range(players), size)
    }
    phi = np.zeros(players)
    for i in range(players):
        for coalition, value in worth.items():
            if i not in coalition:
                weight = math.factorial(len(coalition)) * math.factorial(players - len(coalition) - 1)
                phi[i] += weight / math.factorial(players) * (worth[coalition | {i}] - value)
    return phi


def test_contributions_are_the_exact_shapley_values_of_the_raw_features(embedded_settings: Settings) -> None:
    # The product's pipeline (one-hot categoricals, passthrough numbers, a forest) on a few demo features,
    # a categorical among them: each raw feature is one player, its one-hot columns together.
    rows = validation_frame(embedded_settings, SNAPSHOT_DATES[-2])
    features = ["net_service", "months_active", "monthly_fee", "paperless_billing", "skips_7d"]
    frame = rows[features].reset_index(drop=True)
    pipeline = build_pipeline(
        *feature_kinds(frame), embedded_settings.model_copy(update={"n_estimators": 3, "seed": 5})
    )
    pipeline.set_params(model__max_depth=6)
    pipeline.fit(frame, rows[LABEL].astype(int))
    assert isinstance(pipeline[-1], RandomForestClassifier)
    arrays = forest_arrays(pipeline, features)
    explainer = Explainer(arrays, threads=1)
    # 11 rows on one thread: the kernel walks a tree for 8 rows at once, then for the 3 left over.
    sample = frame.sample(11, random_state=1).reset_index(drop=True)
    sample.loc[0, "net_service"] = "Satellite"  # a category the encoder never saw: every one-hot column 0

    got = explainer.contributions({name: sample[name].to_numpy() for name in features})

    raw_of_column = [raw for raw, _ in arrays.columns]
    for k in range(len(sample)):
        want = _brute_force_shapley(pipeline, sample.iloc[[k]], raw_of_column)
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        arrays.base_value + got.sum(axis=1), pipeline.predict_proba(sample)[:, 1], rtol=0, atol=1e-12
    )
    assert arrays.base_value == pytest.approx(
        np.mean([_path_dependent_value(t, np.zeros(0), raw_of_column, set()) for t in pipeline[-1]]),
        abs=1e-12,
    )


# --- served explanations ------------------------------------------------------------------------------


def test_explained_predictions_add_up_to_their_probability_from_the_base_value(
    embedded_settings: Settings, served_embedded: str
) -> None:
    users = _active_users(embedded_settings, 25)
    with prediction_stub(served_embedded) as stub:
        info = stub.ModelInfo(pb.ModelInfoRequest())
        plain = [stub.Predict(pb.PredictRequest(user_id=u)).prediction for u in users]
        explained = [stub.Predict(pb.PredictRequest(user_id=u, explain=True)).prediction for u in users]

    assert info.HasField("base_value")
    assert 0 < info.base_value < 1
    features = [f.name for f in info.features]
    for without, prediction in zip(plain, explained, strict=True):
        assert not without.contributions
        # Explaining changes nothing else of the answer.
        stripped = pb.Prediction()
        stripped.CopyFrom(prediction)
        del stripped.contributions[:]
        assert stripped == without
        magnitudes = [abs(c.contribution) for c in prediction.contributions]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert sorted(c.name for c in prediction.contributions) == sorted(features)
        total = info.base_value + sum(c.contribution for c in prediction.contributions)
        assert abs(total - prediction.churn_probability) <= ADDITIVITY
    assert len({tuple(sorted(_contributions(p).items())) for p in explained}) > 1


def test_a_full_explained_batch_fits_a_default_client_and_matches_predict(
    embedded_settings: Settings, served_embedded: str
) -> None:
    users = _active_users(embedded_settings, 40)
    batch = list(itertools.islice(itertools.cycle(users), embedded_settings.max_batch_size))
    with prediction_stub(served_embedded) as stub:  # a default channel: 4 MB receive limit
        response = stub.BatchPredict(pb.BatchPredictRequest(user_ids=batch, explain=True))
        single = stub.Predict(pb.PredictRequest(user_id=users[3], explain=True)).prediction
        plain = stub.BatchPredict(pb.BatchPredictRequest(user_ids=users))
        base_value = stub.ModelInfo(pb.ModelInfoRequest()).base_value

    assert len(response.results) == len(batch)
    assert response.ByteSize() < 4 * 1024 * 1024
    for result in response.results:
        prediction = result.prediction
        assert len(prediction.contributions) == len(VIEW_FEATURES)
        total = base_value + sum(c.contribution for c in prediction.contributions)
        assert abs(total - prediction.churn_probability) <= ADDITIVITY
    assert _contributions(response.results[3].prediction) == pytest.approx(_contributions(single), abs=1e-12)
    assert all(not r.prediction.contributions for r in plain.results)


VIEW_FEATURES = [feature for view in VIEW_SPECS for feature in view.features]


def test_every_runtime_explains_alike(embedded_settings: Settings) -> None:
    settings = embedded_settings
    client = mlflow_client(settings)
    version = ModelTarget.parse(settings.model_uri).resolve(client)
    assert version is not None
    models = [
        load_model(settings.model_copy(update={"runtime": runtime}), client, open_store(settings), version)
        for runtime in ("auto", "onnx")
    ]
    artifact = models[0][0]
    assert artifact.explainer is not None
    location = client.get_model_version_download_uri(version.name, str(version.version))
    pipeline = mlflow.sklearn.load_model(location)
    sklearn = LoadedModel.from_artifact(
        dataclasses.replace(artifact, runtime=Runtime.SKLEARN, model=pickle.dumps(pipeline)), settings
    )
    users = _active_users(settings, 30)
    explained = {}
    for loaded in (*(model for _, model in models), sklearn):
        predictor = Predictor(settings, _Serving(loaded))
        explained[loaded.runtime] = predictor.score(users, explain=True)

    assert set(explained) == {Runtime.FOREST, Runtime.ONNX, Runtime.SKLEARN}
    for runtime in (Runtime.FOREST, Runtime.ONNX):
        for a, b in zip(explained[runtime], explained[Runtime.SKLEARN], strict=True):
            assert not isinstance(a, Exception) and not isinstance(b, Exception)
            assert a.contributions == b.contributions
            assert abs(a.churn_probability - b.churn_probability) <= 1e-5  # the runtimes' parity tolerance
            for result in (a, b):
                total = artifact.explainer.base_value + sum(c for _, c in result.contributions)
                assert abs(total - result.churn_probability) <= ADDITIVITY


class _Serving(ModelSource):
    """A model source that serves one already loaded model (the model itself is real)."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self._current = loaded


class _UnexplainablePredictor(Predictor):
    """Serves the real Production model without its explainer, as a model that is not a forest would be
    served: only the explainer's absence is staged."""

    def _model(self) -> LoadedModel:
        return dataclasses.replace(super()._model(), explainer=None)


@pytest.fixture(scope="module")
def unexplainable_server(embedded_settings: Settings) -> Iterator[PredictionServer]:
    from streamflow.server.model_watcher import ModelWatcher

    settings = embedded_settings
    with start_server(
        settings, predictor=_UnexplainablePredictor(settings, ModelWatcher(settings))
    ) as server:
        yield server


@pytest.mark.parametrize("rpc", ["Predict", "BatchPredict"])
def test_explain_on_a_model_without_an_explainer_is_failed_precondition(
    embedded_settings: Settings, unexplainable_server: PredictionServer, rpc: str
) -> None:
    user = _active_users(embedded_settings, 1)[0]
    with prediction_stub(unexplainable_server.local_address) as stub:
        with pytest.raises(grpc.RpcError) as failure:
            if rpc == "Predict":
                stub.Predict(pb.PredictRequest(user_id=user, explain=True))
            else:
                stub.BatchPredict(pb.BatchPredictRequest(user_ids=[user], explain=True))
        answered = stub.Predict(pb.PredictRequest(user_id=user))
        info = stub.ModelInfo(pb.ModelInfoRequest())

    error = wire_error(failure.value)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "EXPLANATIONS_UNAVAILABLE"
    assert dict(error.info.metadata) == {"modelVersion": "1", "cause": "model"}
    assert "without `explain`" in error.status.message
    assert answered.prediction.user_id == user
    assert not info.HasField("base_value")


def test_cli_predict_explain_prints_the_top_contributions(
    embedded_settings: Settings, served_embedded: str
) -> None:
    user = _active_users(embedded_settings, 1)[0]
    with ChurnClient(served_embedded) as client:
        prediction = client.predict(user, explain=True)
    assert not isinstance(prediction, Exception)

    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "streamflow-client"),
            "--target",
            served_embedded,
            "predict",
            "--explain",
            user,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    top = prediction.contributions[0]
    assert any(top.name in line and f"{top.contribution:+.4f}" in line for line in lines), result.stdout
    assert any("base value" in line for line in lines), result.stdout


def test_the_readme_explain_examples_work_as_printed(served_embedded: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Explanations: why this score\n", 1)[1].split("\n### ", 1)[0]
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    grpcurl_line = next(line for line in commands if "grpcurl" in line)
    cli_line = next(line for line in commands if "streamflow-client" in line)
    root = Path(__file__).resolve().parent.parent

    def run(line: str) -> subprocess.CompletedProcess[str]:
        args = shlex.split(line.replace("localhost:50051", served_embedded))
        if args[0].endswith("streamflow-client"):
            args[1:1] = ["--target", served_embedded]
        return subprocess.run(args, cwd=root, capture_output=True, text=True, check=False, timeout=120)

    answered, printed = run(grpcurl_line), run(cli_line)
    with prediction_stub(served_embedded) as stub:
        base_value = stub.ModelInfo(pb.ModelInfoRequest()).base_value

    assert answered.returncode == 0, answered.stderr
    prediction = json.loads(answered.stdout)["prediction"]
    contributions = prediction["contributions"]
    magnitudes = [abs(c["contribution"]) for c in contributions]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert len(contributions) == len(VIEW_FEATURES)
    total = base_value + sum(c["contribution"] for c in contributions)
    assert abs(total - prediction["churnProbability"]) <= ADDITIVITY
    assert printed.returncode == 0, printed.stderr
    assert f"base value {base_value:.4f}; top 5 of 14 contributions:" in printed.stdout


def test_explain_on_an_install_without_the_kernel_is_failed_precondition(
    embedded_settings: Settings, served_embedded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an install without a C compiler: no compiled kernel to be found beside the module.
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".not-built.so"])
    native.kernel.cache_clear()
    user = _active_users(embedded_settings, 1)[0]
    try:
        with prediction_stub(served_embedded) as stub:
            with pytest.raises(grpc.RpcError) as failure:
                stub.Predict(pb.PredictRequest(user_id=user, explain=True))
            answered = stub.Predict(pb.PredictRequest(user_id=user))
    finally:
        native.kernel.cache_clear()

    error = wire_error(failure.value)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "EXPLANATIONS_UNAVAILABLE"
    assert dict(error.info.metadata) == {"modelVersion": "1", "cause": "kernel"}
    assert answered.prediction.user_id == user
