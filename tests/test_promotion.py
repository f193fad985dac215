"""Promotion through the stages with aliases in step, the Production gate, rollback, and refused inputs."""

from __future__ import annotations

import shutil
from urllib.parse import urlparse

import pytest

from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import SNAPSHOT_DATES
from streamflow.settings import Settings
from streamflow.training.registry import (
    ProductionWouldEmpty,
    PromotionRefused,
    current,
    gate,
    promote,
    rollback,
)
from streamflow.training.train import mlflow_client, train
from tests.fixtures.training import registry_state

JAN = SNAPSHOT_DATES[0]


def _stages(settings: Settings) -> dict[str, str]:
    versions, _ = registry_state(settings)
    return {number: stage for number, stage, _ in versions}


def _aliases(settings: Settings) -> dict[str, str]:
    return registry_state(settings)[1]


def test_stage_and_alias_move_together(fresh_embedded_settings: Settings) -> None:
    settings = fresh_embedded_settings
    assert train(settings, JAN).version == 2

    promote(settings, 2, "Staging")
    assert _stages(settings) == {"1": "Production", "2": "Staging"}
    assert _aliases(settings) == {"production": "1", "staging": "2"}

    done = promote(settings, "2", "production")  # stage names are case-insensitive, as in MLflow
    assert (done.version, done.stage, done.previous_production) == (2, "Production", 1)
    # Same data, same seed: the same forest, so the gate sees equal AUCs and lets it through.
    assert done.gate is not None and done.gate.passed
    assert done.gate.candidate_auc == done.gate.production_auc
    assert _stages(settings) == {"1": "Archived", "2": "Production"}
    assert _aliases(settings) == {"production": "2"}

    promote(settings, 2, "Archived", force=True)  # empties Production, so forced
    promote(settings, 1, "None")
    assert _stages(settings) == {"1": "None", "2": "Archived"}
    assert _aliases(settings) == {}


def test_gate_refuses_a_worse_candidate_unless_forced(fresh_embedded_settings: Settings) -> None:
    settings = fresh_embedded_settings
    worse = train(settings.model_copy(update={"n_estimators": 1}), JAN)
    client = mlflow_client(settings)
    production = current(client, settings.model_name, "Production")
    assert production is not None
    checked = gate(settings, client.get_model_version(settings.model_name, str(worse.version)), production)
    assert checked.candidate_auc < checked.production_auc  # one tree is worse than the forest

    before = registry_state(settings)
    with pytest.raises(PromotionRefused) as refusal:
        promote(settings, worse.version, "Production")
    assert str(refusal.value) == (
        f"Version 2 scores AUC {checked.candidate_auc:.4f} on the 2024-01-31 validation split, below "
        f"Production version 1's {checked.production_auc:.4f}; pass --force to promote it anyway."
    )
    assert registry_state(settings) == before

    forced = promote(settings, worse.version, "Production", force=True)
    assert (forced.version, forced.previous_production, forced.gate) == (2, 1, None)
    assert _stages(settings) == {"1": "Archived", "2": "Production"}
    assert _aliases(settings) == {"production": "2"}


def test_rollback_restores_the_previous_production(fresh_embedded_settings: Settings) -> None:
    settings = fresh_embedded_settings
    promote(settings, train(settings, JAN).version, "Production")
    assert _aliases(settings) == {"production": "2"}

    done = rollback(settings)
    assert (done.version, done.previous_production) == (1, 2)
    assert _stages(settings) == {"1": "Production", "2": "Archived"}
    assert _aliases(settings) == {"production": "1"}

    before = registry_state(settings)
    with pytest.raises(StreamflowError) as error:
        rollback(settings)
    assert str(error.value) == (
        "Production version 1 of streamflow_churn replaced no earlier version, "
        "so there is nothing to roll back to."
    )
    assert registry_state(settings) == before


@pytest.mark.parametrize(
    ("version", "stage", "message"),
    [
        ("99", "Production", "Model streamflow_churn has no version 99."),
        ("abc", "Production", "'abc' is not a model version; versions are positive numbers like 1 or 2."),
        ("1", "Prod", "There is no stage 'Prod'; use one of None, Staging, Production, Archived."),
    ],
)
def test_unknown_version_or_stage_changes_nothing(
    fresh_embedded_settings: Settings, version: str, stage: str, message: str
) -> None:
    before = registry_state(fresh_embedded_settings)
    with pytest.raises(StreamflowError) as error:
        promote(fresh_embedded_settings, version, stage)
    assert str(error.value) == message
    assert registry_state(fresh_embedded_settings) == before


@pytest.mark.parametrize("stage", ["Staging", "Archived", "None"])
def test_moving_the_production_version_out_needs_force(fresh_embedded_settings: Settings, stage: str) -> None:
    settings = fresh_embedded_settings
    before = registry_state(settings)
    with pytest.raises(ProductionWouldEmpty) as refusal:
        promote(settings, 1, stage.lower())
    assert str(refusal.value) == (
        f"Version 1 is the Production version of streamflow_churn and moving it to {stage} would leave no "
        "Production for servers to follow; promote another version first, or pass --force."
    )
    assert registry_state(settings) == before

    done = promote(settings, 1, stage, force=True)
    assert (done.version, done.stage) == (1, stage)
    assert _stages(settings) == {"1": stage}
    assert current(mlflow_client(settings), settings.model_name, "Production") is None


def test_rollback_without_a_production_version(fresh_embedded_settings: Settings) -> None:
    settings = fresh_embedded_settings
    promote(settings, 1, "Archived", force=True)
    assert _aliases(settings) == {}
    with pytest.raises(StreamflowError) as error:
        rollback(settings)
    assert str(error.value) == "Model streamflow_churn has no Production version to roll back."


def test_promoting_the_production_version_again_changes_nothing(fresh_embedded_settings: Settings) -> None:
    before = registry_state(fresh_embedded_settings)
    done = promote(fresh_embedded_settings, 1, "Production")
    assert (done.version, done.previous_production, done.gate) == (1, None, None)
    assert registry_state(fresh_embedded_settings) == before


def test_a_candidate_the_gate_cannot_judge_is_refused(fresh_embedded_settings: Settings) -> None:
    settings = fresh_embedded_settings
    client = mlflow_client(settings)
    result = train(settings, JAN)
    source = str(client.get_model_version(settings.model_name, "2").source)  # models:/m-<logged model id>
    # Same model files, but registered without the tags training sets: the gate cannot rebuild its split.
    untagged = client.create_model_version(settings.model_name, source, run_id=result.run_id)
    # Version 2 with its model files gone: the gate cannot score it.
    logged = client.get_logged_model(source.split("/")[-1])
    shutil.rmtree(urlparse(logged.artifact_location).path)
    before = registry_state(settings)

    with pytest.raises(StreamflowError) as error:
        promote(settings, untagged.version, "Production")
    assert str(error.value) == (
        "Version 3 has no as_of tag, so the gate cannot rebuild its validation split; "
        "promote it with --force if it is what you want."
    )
    with pytest.raises(StreamflowError) as error:
        promote(settings, 2, "Production")
    assert str(error.value).startswith("Version 2 of streamflow_churn cannot be loaded for the gate (")
    assert registry_state(settings) == before
