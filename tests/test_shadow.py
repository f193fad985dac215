"""Shadow scoring (issue 14): a candidate scores the live users beside Production, off the response path.

The same model as its own shadow agrees on every user with |Δp| 0, over two workers whose counts add up in
ModelInfo, the metrics and the registry; a shadow that fails to load or throws never changes a Production
answer; a different model (version 2, trained at another snapshot) is measured as such, checked against the
two models' answers taken independently (a server that serves version 2); and `streamflow promote` refuses
or allows by the evidence the server recorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import mlflow
import numpy as np
import pandas as pd
import pytest
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression

from streamflow.client import ChurnClient
from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import JOIN_KEY, SNAPSHOT_DATES, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.model_contract import ShadowEvidence, combined_evidence, evidence_production_version
from streamflow.server.features import FeatureRow
from streamflow.server.loaded_model import LoadedModel
from streamflow.server.model_watcher import ModelWatcher
from streamflow.server.onnx_runtime import PROBABILITIES_OUTPUT, OnnxModel
from streamflow.server.prediction_log import PredictionLog, Record, RecordQueue
from streamflow.server.predictor import Predictor
from streamflow.server.shadow import DELTA_BUCKETS, SHADOW_DROPPED, ShadowModel, ShadowScorer
from streamflow.server.shadow_evidence import shadow_watcher
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.demo_data import table_path
from streamflow.training.registry import EvidenceRequired, PromotionRefused, promote
from streamflow.training.train import mlflow_client, train
from tests.fixtures.metrics import free_port, scrape
from tests.fixtures.processes import STREAMFLOW, serve_env, serving_process
from tests.fixtures.serving import every_worker, prediction_stub, server_settings, start_server
from tests.fixtures.training import relocate_home

VERSION_1 = "models:/streamflow_churn/1"
BOUND_S = 60.0
"""How long a test waits for counts to arrive before failing; a bound, not a budget."""


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {BOUND_S:.0f} s: {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_versions(embedded_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A private home: version 1 in Production, version 2 trained at the second snapshot (no stage)."""
    home = tmp_path_factory.mktemp("shadow") / "home"
    relocate_home(embedded_settings.home, home)
    settings = embedded_settings.model_copy(update={"home": home})
    store.apply(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    result = train(settings, SNAPSHOT_DATES[1])
    assert str(result.version) == "2"
    yield settings


def current_users(settings: Settings) -> list[str]:
    """Every user of the last snapshot (all have fresh features)."""
    table = pd.read_parquet(table_path(settings, VIEW_SPECS[0].table))
    return sorted(set(table.loc[table[TIMESTAMP_FIELD].dt.date == SNAPSHOT_DATES[-1], JOIN_KEY]))


def probabilities(stub: object, users: list[str]) -> dict[str, float]:
    response = stub.BatchPredict(pb.BatchPredictRequest(user_ids=users), timeout=60)  # type: ignore[attr-defined]
    return {
        r.prediction.user_id: r.prediction.churn_probability
        for r in response.results
        if r.HasField("prediction")
    }


def p99_bound(deltas: np.ndarray) -> float:
    """The contract's p99: the smallest bucket bound at or under which at least 99% of the |Δp| lie."""
    return next(b for b in DELTA_BUCKETS if np.count_nonzero(deltas <= b) >= 0.99 * len(deltas))


def comparison(info: pb.ModelInfoResponse, shadow: str, production: str) -> pb.ShadowComparison | None:
    return next(
        (
            c
            for c in info.shadow.comparisons
            if (c.shadow_version, c.production_version) == (shadow, production)
        ),
        None,
    )


def evidence(settings: Settings, version: str, production: str) -> ShadowEvidence | None:
    """The version's shadow evidence against `production`, summed over every server run that recorded one."""
    tags = mlflow_client(settings).get_model_version(settings.model_name, version).tags
    runs = [
        ShadowEvidence.from_json(t) for k, t in tags.items() if evidence_production_version(k) == production
    ]
    return combined_evidence(runs) if runs else None


def incompatible_onnx() -> OnnxModel:
    """A real ONNX model whose one input is a feature the served model does not read: it throws on scoring."""
    features = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    fitted = LogisticRegression().fit(features, [0, 0, 1, 1])
    exported = convert_sklearn(
        fitted,
        initial_types=[("signup_channel_score", FloatTensorType([None, 1]))],
        options={"zipmap": False},
    )
    for output, name in zip(exported.graph.output, ("label", PROBABILITIES_OUTPUT), strict=False):
        output.name = name
    return OnnxModel(exported.SerializeToString())


def test_a_shadow_that_throws_or_fails_to_load_never_changes_an_answer(
    two_versions: Settings, served_embedded: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    users = current_users(two_versions)[:50]
    with prediction_stub(served_embedded) as plain:
        expected = probabilities(plain, users)

    # Fails to load: a version whose URI points at nothing loadable (a stage no version holds is not a
    # failure; a version without validation metrics is refused).
    unvalidated = register_unvalidated(two_versions)
    uri = f"models:/streamflow_churn/{unvalidated}"
    with (
        start_server(two_versions, model_uri=VERSION_1, shadow_model_uri=uri) as running,
        ChurnClient(running.local_address, timeout=30) as churn,
        prediction_stub(running.local_address) as stub,
    ):
        eventually(
            lambda: stub.ModelInfo(pb.ModelInfoRequest()).shadow.HasField("last_reload_failure"),
            "the shadow is refused",
        )
        assert {u: churn.predict(u).churn_probability for u in users} == expected
        info = stub.ModelInfo(pb.ModelInfoRequest())
    assert info.shadow.last_reload_failure.model_version == str(unvalidated)
    refused = [
        r for r in caplog.records if r.name.endswith("model_watcher.shadow") and r.levelno == logging.ERROR
    ]
    assert len(refused) == 1, refused  # logged once, as the shadow's
    assert "no val_auc metric" in refused[0].getMessage()
    assert not info.shadow.HasField("model")
    assert list(info.shadow.comparisons) == []

    # Throws: the scorer of a worker whose control plane sent a shadow it cannot score the features with.
    settings = server_settings(two_versions, model_uri=VERSION_1)
    throwing = ShadowModel()
    with start_server(two_versions, model_uri=VERSION_1) as reference:
        served: LoadedModel | None = reference.predictor.watcher.current
    assert served is not None
    throwing.set(dataclasses.replace(served, model=incompatible_onnx()), None, tmp_path)
    scorer = ShadowScorer("models:/streamflow_churn/Staging", 1.0, throwing, logged=True)
    predictor = Predictor(settings, ModelWatcher(settings), scorer)
    records: list[Record] = []
    with (
        start_server(settings, predictor=predictor, prediction_log=memory_log(records)) as running,
        ChurnClient(running.local_address, timeout=30) as churn,
        prediction_stub(running.local_address) as stub,
    ):
        assert {u: churn.predict(u).churn_probability for u in users} == expected
        batch = churn.batch_predict(users)
        assert {r.user_id: getattr(r.outcome, "churn_probability", None) for r in batch} == expected
        eventually(
            lambda: stub.ModelInfo(pb.ModelInfoRequest()).shadow.users_dropped == 2 * len(users),
            "every sampled user counted as dropped",
        )
        assert list(stub.ModelInfo(pb.ModelInfoRequest()).shadow.comparisons) == []
        assert scorer.alive  # the thread survived every failure
    # Each answer is still logged once, without a shadow result.
    assert sorted(pb.Prediction.FromString(r[2]).user_id for r in records) == sorted(users * 2)
    assert [r[3] for r in records] == [None] * len(records)


def register_unvalidated(settings: Settings) -> str:
    """Version 1's model registered again from a run that logged no validation metrics: refused at load."""
    client = mlflow_client(settings)
    source = client.get_model_version(settings.model_name, "1")
    run = client.create_run(client.get_run(str(source.run_id)).info.experiment_id)
    client.set_terminated(run.info.run_id)
    return str(
        client.create_model_version(
            settings.model_name, source.source or "", run_id=run.info.run_id, tags=dict(source.tags)
        ).version
    )


def two_worker_env(settings: Settings, shadow_uri: str, metrics_port: int, tmp: Path) -> dict[str, str]:
    """`streamflow serve` with 2 workers serving version 1 beside the shadow `shadow_uri`; `tmp` holds the
    supervisor's private folder, where each worker reports its tallies."""
    return serve_env(
        MLFLOW_TRACKING_URI=settings.tracking_uri,
        STREAMFLOW_HOME=str(settings.home),
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_WORKERS="2",
        STREAMFLOW_POLL_INTERVAL_S="0.25",
        STREAMFLOW_METRICS_PORT=str(metrics_port),
        STREAMFLOW_MODEL_URI=VERSION_1,
        STREAMFLOW_SHADOW_MODEL_URI=shadow_uri,
        TMPDIR=str(tmp),
    )


def test_a_refused_shadow_under_two_workers_is_reported_by_each_and_changes_no_answer(
    two_versions: Settings, served_embedded: str, tmp_path: Path
) -> None:
    users = current_users(two_versions)[:20]
    with prediction_stub(served_embedded) as plain:
        expected = probabilities(plain, users)
    unvalidated = register_unvalidated(two_versions)
    metrics_port = free_port()
    environment = two_worker_env(
        two_versions, f"models:/streamflow_churn/{unvalidated}", metrics_port, tmp_path
    )
    log = tmp_path / "serve.log"
    with serving_process(environment, log) as (_, address):
        eventually(
            lambda: every_worker(
                address, lambda info: info.shadow.last_reload_failure.model_version == unvalidated
            ),
            "every worker reports the refused shadow",
        )
        for _ in range(6):  # fresh connections: both workers answer, each as without a shadow
            with prediction_stub(address) as stub:
                assert probabilities(stub, users) == expected
        scraped = scrape(metrics_port)
    assert scraped.value("streamflow_model_reloads_total", model="shadow", outcome="refused") == 1
    assert scraped.value("streamflow_model_reloads_total", model="served", outcome="refused") == 0
    assert log.read_text().count("no val_auc metric") == 1  # the control plane refused it once, for both


def memory_log(records: list[Record]) -> PredictionLog:
    """A prediction log whose sink is `records` (the server closes it, so flushes it, when it stops)."""
    return PredictionLog(RecordQueue(records.extend, 10_000, "test"))


def test_each_logged_prediction_carries_the_shadows_answer_for_the_same_user(
    two_versions: Settings, tmp_path: Path
) -> None:
    settings = server_settings(two_versions, model_uri=VERSION_1)
    users = current_users(two_versions)[:30]
    with (
        start_server(two_versions, model_uri="models:/streamflow_churn/2") as other,
        prediction_stub(other.local_address) as reference,
    ):
        version_2 = other.predictor.watcher.current
        expected = probabilities(reference, users)  # what version 2 answers for each user
    assert version_2 is not None
    shadow = ShadowModel()
    shadow.set(version_2, None, tmp_path)
    predictor = Predictor(settings, ModelWatcher(settings), ShadowScorer(VERSION_1, 1.0, shadow, logged=True))
    records: list[Record] = []
    with (
        start_server(settings, predictor=predictor, prediction_log=memory_log(records)) as running,
        prediction_stub(running.local_address) as stub,
    ):
        served = [stub.Predict(pb.PredictRequest(user_id=u), timeout=30).prediction for u in users[:10]]
        batch = stub.BatchPredict(pb.BatchPredictRequest(user_ids=users[10:]), timeout=30)
        served += [r.prediction for r in batch.results]
    # Stopped: whatever the shadow still held was scored and logged, each user once, with both answers.
    assert len(records) == len(users)
    logged = {pb.Prediction.FromString(r[2]).user_id: r for r in records}
    for prediction in served:
        _, _, answer, shadow_bytes = logged[prediction.user_id]
        assert pb.Prediction.FromString(answer) == prediction
        assert shadow_bytes is not None
        result = pb.Prediction.FromString(shadow_bytes)
        assert (result.user_id, result.model.version) == (prediction.user_id, "2")
        assert result.churn_probability == pytest.approx(expected[prediction.user_id], abs=1e-6)
        assert result.label == (
            pb.CHURN_LABEL_CHURN if result.churn_probability > 0.5 else pb.CHURN_LABEL_STAY
        )


def test_the_same_model_agrees_on_every_user_and_two_workers_add_up_in_model_info_metrics_and_registry(
    two_versions: Settings, tmp_path: Path
) -> None:
    metrics_port = free_port()
    environment = two_worker_env(two_versions, VERSION_1, metrics_port, tmp_path)
    users = current_users(two_versions)[:8]
    calls = 0
    earlier = evidence(two_versions, "1", "1")  # other tests' runs of the same shadow, in this module's home
    earlier_users, earlier_runs = (0, 0) if earlier is None else (earlier.users, earlier.runs)
    with serving_process(environment, tmp_path / "serve.log") as (_, address):
        eventually(
            lambda: every_worker(address, lambda info: info.shadow.model.version == "1"),
            "every worker serves and has the shadow",
        )
        # Fresh channels: the kernel spreads new connections over both workers.
        for _ in range(24):
            with prediction_stub(address) as stub:
                for user in users:
                    stub.Predict(pb.PredictRequest(user_id=user), timeout=30)
                    calls += 1

        def compared_everywhere() -> bool:
            for _ in range(6):  # any worker answers with the server's totals
                with prediction_stub(address) as stub:
                    c = comparison(stub.ModelInfo(pb.ModelInfoRequest()), "1", "1")
                    if c is None or c.users_compared != calls:
                        return False
            return True

        eventually(compared_everywhere, f"{calls} users compared, as every worker reports")
        scraped = scrape(metrics_port)
        # Each worker scored a part and reports it (every half second); the totals above are their sum.
        (folder,) = tmp_path.glob("streamflow-artifacts-*")

        def parts() -> list[int]:
            reports = sorted(folder.glob("shadow/*.json"))  # a worker's first report may hold no tally yet
            return [sum(t[2]["users"] for t in json.loads(r.read_text())["tallies"]) for r in reports]

        eventually(lambda: sum(parts()) == calls, "each worker's report is in")
        assert len(parts()) == 2
        assert all(parts())
        with prediction_stub(address) as stub:
            info = stub.ModelInfo(pb.ModelInfoRequest())
        eventually(
            lambda: (e := evidence(two_versions, "1", "1")) is not None and e.users == earlier_users + calls,
            "the supervisor recorded the server's totals",
        )
    recorded = evidence(two_versions, "1", "1")
    assert recorded is not None and recorded.runs == earlier_runs + 1  # its own tag, beside earlier runs'
    assert scraped.value("streamflow_shadow_users_total", shadow_version="1", production_version="1") == calls
    # The shadow's load is its own, not read as a load of the served model.
    assert scraped.value("streamflow_model_reloads_total", model="served", outcome="loaded") == 1
    assert scraped.value("streamflow_model_reloads_total", model="shadow", outcome="loaded") == 1
    assert (
        scraped.value("streamflow_shadow_agreements_total", shadow_version="1", production_version="1")
        == calls
    )
    assert (
        scraped.value("streamflow_shadow_abs_delta_count", shadow_version="1", production_version="1")
        == calls
    )
    assert scraped.value("streamflow_shadow_abs_delta_bucket", le="0.0", shadow_version="1") == calls
    # The same model as its own shadow: it agrees on every user, with |Δp| 0.
    compared = comparison(info, "1", "1")
    assert compared is not None
    assert (compared.label_agreement, compared.mean_abs_delta, compared.p99_abs_delta) == (1.0, 0.0, 0.0)
    assert (info.shadow.model.version, info.shadow.model_uri, info.shadow.sample) == ("1", VERSION_1, 1.0)
    assert info.shadow.users_dropped == 0
    assert not info.shadow.HasField("last_reload_failure")
    log = (tmp_path / "serve.log").read_text()
    assert f"{calls} users compared, label agreement 100.00%" in log


def test_a_different_model_is_measured_as_such_and_its_evidence_gates_promotion(
    two_versions: Settings, tmp_path: Path
) -> None:
    settings = two_versions
    users = current_users(settings)
    with (
        start_server(settings, model_uri="models:/streamflow_churn/2") as candidate,
        prediction_stub(candidate.local_address) as stub,
    ):
        by_candidate = probabilities(stub, users)  # the shadow's answers, taken independently
    with (
        start_server(settings, model_uri=VERSION_1, shadow_model_uri="models:/streamflow_churn/2") as running,
        prediction_stub(running.local_address) as stub,
    ):
        eventually(
            lambda: stub.ModelInfo(pb.ModelInfoRequest()).shadow.model.version == "2", "the shadow loads"
        )
        by_production = probabilities(stub, users)
        eventually(
            lambda: (
                (c := comparison(stub.ModelInfo(pb.ModelInfoRequest()), "2", "1")) is not None
                and c.users_compared == len(by_production)
            ),
            "every answered user compared",
        )
        compared = comparison(stub.ModelInfo(pb.ModelInfoRequest()), "2", "1")
        eventually(
            lambda: (e := evidence(settings, "2", "1")) is not None and e.users == len(by_production),
            "the evidence recorded in the registry",
        )
    assert compared is not None
    both = sorted(set(by_production) & set(by_candidate))
    assert len(both) == len(by_production) > 500
    production = np.array([by_production[u] for u in both])
    shadow = np.array([by_candidate[u] for u in both])
    deltas = np.abs(shadow - production)
    agreement = float(np.mean((production > 0.5) == (shadow > 0.5)))
    assert deltas.mean() > 0  # a different model indeed
    assert agreement < 1.0
    assert compared.label_agreement == pytest.approx(agreement, abs=1e-12)
    assert compared.mean_abs_delta == pytest.approx(float(deltas.mean()), abs=1e-9)
    assert compared.p99_abs_delta == p99_bound(deltas)
    recorded = evidence(settings, "2", "1")
    assert recorded is not None
    assert (recorded.users, recorded.label_agreement) == (len(both), pytest.approx(agreement, abs=1e-12))

    # A restarted server adds its users to the evidence instead of starting it again.
    again = both[:40]
    with (
        start_server(settings, model_uri=VERSION_1, shadow_model_uri="models:/streamflow_churn/2") as running,
        prediction_stub(running.local_address) as stub,
    ):
        eventually(
            lambda: stub.ModelInfo(pb.ModelInfoRequest()).shadow.model.version == "2",
            "the shadow loads again",
        )
        assert probabilities(stub, again) == {u: by_production[u] for u in again}
        total = len(both) + len(again)
        eventually(
            lambda: (e := evidence(settings, "2", "1")) is not None and e.users == total,
            "the second run's users added to the first run's",
        )
    combined = evidence(settings, "2", "1")
    assert combined is not None and combined.runs == 2
    production = np.concatenate([production, [by_production[u] for u in again]])
    shadow = np.concatenate([shadow, [by_candidate[u] for u in again]])
    agreement = float(np.mean((production > 0.5) == (shadow > 0.5)))
    assert combined.label_agreement == pytest.approx(agreement, abs=1e-12)
    assert combined.mean_abs_delta == pytest.approx(float(np.abs(shadow - production).mean()), abs=1e-9)

    # Promotion by that evidence: refused for too few users or too low an agreement, even with --force.
    refusals = {
        EvidenceRequired(min_users=total + 1): f"on {total} users as a shadow, fewer than the",
        EvidenceRequired(min_agreement=math.nextafter(agreement, 1.0)): "below the",
    }
    for required, sentence in refusals.items():
        with pytest.raises(PromotionRefused) as refused:
            promote(settings, "2", "Production", force=True, evidence=required)
        assert sentence in str(refused.value)
    cli = subprocess.run(
        [str(STREAMFLOW), "promote", "2", "--stage", "Production", "--min-shadow-users", str(total + 1)],
        env=serve_env(MLFLOW_TRACKING_URI=settings.tracking_uri, STREAMFLOW_HOME=str(settings.home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode != 0
    assert f"Version 2 was compared with Production version 1 on {total} users" in cli.stderr
    assert mlflow_client(settings).get_model_version(settings.model_name, "2").current_stage != "Production"

    # Evidence that is missing, or against another Production version, is refused too.
    client = mlflow_client(settings)
    source = client.get_model_version(settings.model_name, "2")
    bare = client.create_model_version(
        settings.model_name, source.source or "", run_id=source.run_id, tags={}
    )
    with pytest.raises(PromotionRefused, match="has no shadow evidence"):
        promote(settings, bare.version, "Production", force=True, evidence=EvidenceRequired(min_users=1))
    elsewhere = dataclasses.replace(recorded, production_version="9", run="")  # the tag's form before runs
    assert elsewhere.tag == "shadow_evidence.9"
    client.set_model_version_tag(settings.model_name, bare.version, elsewhere.tag, elsewhere.to_json())
    with pytest.raises(PromotionRefused, match="against Production version\\(s\\) 9, not the current"):
        promote(settings, bare.version, "Production", force=True, evidence=EvidenceRequired(min_users=1))
    # One unreadable run's tag among readable ones: refused, naming that tag, rather than summed without it.
    client.set_model_version_tag(settings.model_name, bare.version, recorded.tag, recorded.to_json())
    client.set_model_version_tag(settings.model_name, bare.version, "shadow_evidence.1.broken", "{not json")
    with pytest.raises(PromotionRefused) as unreadable:
        promote(settings, bare.version, "Production", force=True, evidence=EvidenceRequired(min_users=1))
    assert str(unreadable.value) == (
        f"Version {bare.version}'s shadow evidence tag shadow_evidence.1.broken is unreadable."
    )

    done = promote(
        settings,
        "2",
        "Production",
        force=True,
        evidence=EvidenceRequired(total, combined.label_agreement),
    )
    assert (done.version, done.stage, done.previous_production) == (2, "Production", 1)


def test_a_full_queue_drops_the_users_and_counts_them_without_blocking_the_call(tmp_path: Path) -> None:
    scorer = ShadowScorer(VERSION_1, 1.0, ShadowModel(), tmp_path, queue_users=3)  # thread not started
    rows = [FeatureRow("7590-VHVEG", ()), FeatureRow("5575-GNVDE", ())]
    answered = cast(LoadedModel, object())  # the queue only holds it for the thread
    before = SHADOW_DROPPED.labels("queue_full")._value.get()
    scorer.offer(answered, rows, np.array([0.2, 0.7]))
    scorer.offer(answered, rows, np.array([0.2, 0.7]))  # 4 users would exceed 3: this call's are dropped
    scorer.offer(answered, rows[:1], np.array([0.2]))  # 3 fit
    assert scorer.totals().dropped == 2
    assert SHADOW_DROPPED.labels("queue_full")._value.get() - before == 2


def test_a_sample_below_one_queues_about_that_share_of_the_users_and_logs_the_rest_without_a_shadow(
    tmp_path: Path,
) -> None:
    """STREAMFLOW_SHADOW_SAMPLE: each user is queued for the shadow with that probability. 4,000 users at 0.25
    queue 1,000 give or take 6 standard deviations (27 users each): a wrong rate fails, chance does not."""
    answered = cast(LoadedModel, object())  # the queue only holds it for the thread (not started here)
    rows = [FeatureRow(f"user-{i}", ()) for i in range(100)]
    probabilities = np.linspace(0.0, 1.0, len(rows))
    for sample, low, high in ((0.25, 836, 1164), (1.0, 4000, 4000), (0.0, 0, 0)):
        scorer = ShadowScorer(VERSION_1, sample, ShadowModel(), tmp_path, queue_users=10_000, logged=True)
        queued = 0
        for _ in range(40):
            slots = scorer.offer(answered, rows, probabilities)
            if slots is not None:
                assert len(slots) == len(rows)  # one per row, in order: None for a row not sampled
                queued += sum(slot is not None for slot in slots)
        assert low <= queued <= high, (sample, queued)
        assert scorer.totals().dropped == 0


def test_the_served_model_loads_before_the_shadow_at_start_up(
    embedded_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Models load one at a time; the shadow watcher, started first here, waits for the served watcher's
    first poll, so the served model never waits for the shadow's load."""
    settings = embedded_settings.model_copy(update={"shadow_model_uri": VERSION_1})
    served = ModelWatcher(settings)
    shadow = shadow_watcher(settings, served)
    assert shadow is not None
    caplog.set_level(logging.INFO, logger="streamflow.server.model_watcher")
    shadow.start()
    try:
        time.sleep(0.5)  # without the wait, the shadow resolves its version and starts loading by now
        assert shadow.current is None
        served.start()
        eventually(lambda: served.current is not None and shadow.current is not None, "both models load")
    finally:
        shadow.stop()
        served.stop()
    loading = [r.name for r in caplog.records if r.getMessage().startswith("loading streamflow_churn")]
    assert loading == ["streamflow.server.model_watcher", "streamflow.server.model_watcher.shadow"]
