"""The training commands of `streamflow`, run as a user runs them: exit codes, output, one-sentence errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from streamflow.cli import main
from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import (
    FEATURE_NAMES,
    FEATURE_SERVICE_NAME,
    LABELS_TABLE,
    SNAPSHOT_DATES,
)
from streamflow.settings import Settings
from streamflow.training import demo_data
from streamflow.training.bootstrap import bootstrap
from tests.fixtures.training import FIXTURE_USERS, fixture_settings, registry_state

JAN = demo_data.snapshot_timestamp(SNAPSHOT_DATES[0])


def _environment(settings: Settings) -> dict[str, str]:
    """The shell environment that makes `streamflow` use `settings` (and nothing inherited)."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_") and k != "MLFLOW_TRACKING_URI"
    }
    return {
        **inherited,
        "STREAMFLOW_HOME": str(settings.home),
        "STREAMFLOW_PROFILE": "embedded",
        "STREAMFLOW_USERS": str(settings.users),
        "STREAMFLOW_SEED": str(settings.seed),
        "STREAMFLOW_N_ESTIMATORS": str(settings.n_estimators),
    }


Use = Callable[[Settings], None]


@pytest.fixture
def use(monkeypatch: pytest.MonkeyPatch) -> Use:
    """Point the in-process `streamflow` at some settings through the environment, as a shell would."""

    def point(settings: Settings) -> None:
        for key in list(os.environ):
            if key.startswith("STREAMFLOW_") or key == "MLFLOW_TRACKING_URI":
                monkeypatch.delenv(key)
        for key, value in _environment(settings).items():
            monkeypatch.setenv(key, value)

    return point


def _one_sentence_error(stderr: str) -> str:
    """The error line, after checking it is the only one and reads as one sentence without a traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    message = errors[0].removeprefix("error: ")
    assert message.endswith(".") and ". " not in message, message
    return message


def test_train_json_prints_version_run_and_metrics(
    fresh_embedded_settings: Settings, use: Use, capsys: pytest.CaptureFixture[str]
) -> None:
    use(fresh_embedded_settings)
    assert main(["train", "--as-of", "2024-01-31", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)

    assert summary["version"] == 2 and summary["model_name"] == "streamflow_churn"
    assert summary["as_of"] == "2024-01-31" and len(summary["training_set_fingerprint"]) == 64
    assert set(summary["metrics"]) == {
        "val_auc",
        "val_f1",
        "val_accuracy",
        "val_precision",
        "val_recall",
        "training_time_s",
    }
    versions, _ = registry_state(fresh_embedded_settings)
    assert [(number, stage, tags["feature_service"]) for number, stage, tags in versions] == [
        ("1", "Production", FEATURE_SERVICE_NAME),
        ("2", "None", FEATURE_SERVICE_NAME),
    ]


def _drop_january_labels(settings: Settings) -> None:
    path = demo_data.table_path(settings, LABELS_TABLE)
    labels = pd.read_parquet(path)
    labels[labels["as_of"] != JAN].to_parquet(path, index=False)


def _label_strangers_in_january(settings: Settings) -> None:
    path = demo_data.table_path(settings, LABELS_TABLE)
    labels = pd.read_parquet(path)
    january = labels["as_of"] == JAN
    labels.loc[january, "user_id"] = [f"{n:04d}-ZZZZZ" for n in range(int(january.sum()))]
    labels.to_parquet(path, index=False)


def _no_change(settings: Settings) -> None:
    return None


@pytest.mark.parametrize(
    ("prepare", "argv", "message"),
    [
        (
            _no_change,
            ["train", "--as-of", "2024-03-31"],
            "There is no snapshot dated 2024-03-31; the snapshots are dated: 2024-01-31, 2024-02-29.",
        ),
        (
            _no_change,
            ["train", "--as-of", "31/01/2024"],
            "--as-of '31/01/2024' is not a date like 2024-01-31.",
        ),
        (
            _drop_january_labels,
            ["train", "--as-of", "2024-01-31"],
            "The churn_labels table has no labels dated 2024-01-31, so there is nothing to learn.",
        ),
        (
            _label_strangers_in_january,
            ["train", "--as-of", "2024-01-31"],
            f"None of the {FIXTURE_USERS} users of the 2024-01-31 snapshot has a label in churn_labels.",
        ),
        (_no_change, ["promote", "99", "--stage", "Production"], "Model streamflow_churn has no version 99."),
        (
            _no_change,
            ["promote", "1", "--stage", "Prod"],
            "There is no stage 'Prod'; use one of None, Staging, Production, Archived.",
        ),
        (
            _no_change,
            ["promote", "1", "--stage", "Staging"],
            "Version 1 is the Production version of streamflow_churn and moving it to Staging would leave no "
            "Production for servers to follow; promote another version first, or pass --force.",
        ),
        (
            _no_change,
            ["rollback"],
            "Production version 1 of streamflow_churn replaced no earlier version, "
            "so there is nothing to roll back to.",
        ),
    ],
    ids=[
        "no-snapshot",
        "not-a-date",
        "empty-labels",
        "empty-join",
        "unknown-version",
        "unknown-stage",
        "empty-production",
        "rollback",
    ],
)
def test_bad_input_exits_1_with_one_sentence_and_changes_nothing(
    fresh_embedded_settings: Settings,
    use: Use,
    capsys: pytest.CaptureFixture[str],
    prepare: Callable[[Settings], None],
    argv: list[str],
    message: str,
) -> None:
    prepare(fresh_embedded_settings)
    use(fresh_embedded_settings)
    before = registry_state(fresh_embedded_settings)

    assert main(argv) == 1
    assert _one_sentence_error(capsys.readouterr().err) == message
    assert registry_state(fresh_embedded_settings) == before


def test_force_moves_the_production_version_out(
    fresh_embedded_settings: Settings, use: Use, capsys: pytest.CaptureFixture[str]
) -> None:
    use(fresh_embedded_settings)
    assert main(["promote", "1", "--stage", "Staging", "--force"]) == 0
    assert capsys.readouterr().out == "streamflow_churn version 1 is now in Staging\n"
    versions, aliases = registry_state(fresh_embedded_settings)
    assert [(number, stage) for number, stage, _ in versions] == [("1", "Staging")]
    assert aliases == {"staging": "1"}


def test_the_installed_command_reports_errors_in_one_sentence(fresh_embedded_settings: Settings) -> None:
    streamflow = Path(sys.executable).with_name("streamflow")
    before = registry_state(fresh_embedded_settings)
    done = subprocess.run(
        [str(streamflow), "promote", "7", "--stage", "Staging"],
        env=_environment(fresh_embedded_settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert _one_sentence_error(done.stderr) == "Model streamflow_churn has no version 7."
    assert registry_state(fresh_embedded_settings) == before


def test_a_second_bootstrap_finds_everything_in_place(
    fresh_embedded_settings: Settings, use: Use, capsys: pytest.CaptureFixture[str]
) -> None:
    before = registry_state(fresh_embedded_settings)
    report = bootstrap(fresh_embedded_settings)
    assert (report.data_written, report.materialized, report.trained_version) == (False, False, None)
    assert report.production_version == 1

    use(fresh_embedded_settings)
    assert main(["bootstrap"]) == 0
    assert "streamflow_churn version 1 in Production" in capsys.readouterr().out
    assert registry_state(fresh_embedded_settings) == before


def test_bootstrap_redoes_the_steps_whose_inputs_changed(fresh_embedded_settings: Settings) -> None:
    reseeded = fresh_embedded_settings.model_copy(update={"seed": 7})
    report = bootstrap(reseeded)
    assert (report.data_written, report.materialized, report.trained_version) == (True, True, 2)
    assert demo_data.written_manifest(reseeded)["seed"] == 7  # type: ignore[index]
    assert store.is_materialized(reseeded, report.data_fingerprint)
    versions, aliases = registry_state(reseeded)
    assert versions[0][2]["training_set_fingerprint"] != versions[1][2]["training_set_fingerprint"]
    assert aliases["production"] == str(report.production_version)

    again = bootstrap(reseeded)
    assert (again.data_written, again.materialized, again.trained_version) == (False, False, None)
    assert len(registry_state(reseeded)[0]) == 2


def test_generate_apply_materialize_fill_the_online_store(
    tmp_path: Path, use: Use, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = fixture_settings(tmp_path)
    use(settings)
    assert main(["materialize"]) == 1
    assert _one_sentence_error(capsys.readouterr().err) == (
        "The feature views are not registered; run `streamflow apply` first."
    )

    assert main(["generate", "--users", "40", "--seed", "5"]) == 0
    assert main(["apply"]) == 0
    assert main(["materialize"]) == 0
    manifest = demo_data.written_manifest(settings)
    assert manifest is not None and (manifest["users"], manifest["seed"]) == (40, 5)
    assert store.is_materialized(settings, manifest["fingerprint"])

    feast = store.open_store(settings)
    online = feast.get_online_features(
        features=feast.get_feature_service(FEATURE_SERVICE_NAME), entity_rows=[{"user_id": "7590-VHVEG"}]
    ).to_dict()
    february = pd.read_parquet(demo_data.table_path(settings, "subscriptions_profile_snapshots"))
    latest = february[february["user_id"] == "7590-VHVEG"].sort_values("as_of").iloc[-1]
    assert online["months_active"] == [latest["months_active"]]
    assert all(online[name] != [None] for name in FEATURE_NAMES)
