"""The README is the front door: its set-up commands must do what it says, and its settings table must name
every setting with its real default and the variable that really sets it."""

import re
import subprocess
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from streamflow.settings import LogFormat, Profile, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _env_name(field: str) -> str:
    return "MLFLOW_TRACKING_URI" if field == "mlflow_tracking_uri" else f"STREAMFLOW_{field.upper()}"


def _row(env: str) -> str:
    match = re.search(rf"^\| `{env}` \|.*$", README, flags=re.MULTILINE)
    assert match, f"README's settings table has no row for {env}"
    return match.group(0)


def _default_cell(row: str) -> str:
    return row.split(" | ")[1]


def _documented(default: Any) -> str:
    """How the README's default column must spell `default`."""
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, Enum):
        return f"`{default.value}`"
    if isinstance(default, datetime):
        return f"`{default.isoformat()}`"
    if isinstance(default, Path) and default.is_absolute():
        # A folder of the checkout: the README cannot know where the checkout lives.
        return f"`{default.relative_to(ROOT)}/` of this checkout"
    if default is None:
        return "see description"
    if isinstance(default, int | float | str | Path):
        return f"`{default}`"
    raise AssertionError(f"no rule for documenting a default of type {type(default).__name__}")


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_has_a_readme_row_with_its_default(field: str) -> None:
    row = _row(_env_name(field))
    default = Settings.model_fields[field].get_default(call_default_factory=True)

    assert _default_cell(row) == _documented(default), row
    if default is None:
        # "see description": the description must then say what happens when it is unset.
        assert "Unset:" in row, row


# A non-default value per setting, as the environment spells it, and what Settings must make of it. Plain
# numbers and flags not listed here are derived from their default (`_non_default`).
ENVIRONMENT: dict[str, tuple[str, Any]] = {
    "profile": ("production", Profile.PRODUCTION),
    "shadow_model_uri": ("models:/streamflow_churn/Staging", "models:/streamflow_churn/Staging"),
    "shadow_sample": ("0.25", 0.25),
    "home": ("/srv/streamflow-home", Path("/srv/streamflow-home")),
    "users": ("123", 123),
    "seed": ("7", 7),
    "feature_repo": ("/srv/repo", Path("/srv/repo")),
    "postgres_dsn": ("postgresql://u@db:5433/x", "postgresql://u@db:5433/x"),
    "redis_url": ("redis://cache:6380/2", "redis://cache:6380/2"),
    "redis_key_prefix": ("elsewhere", "elsewhere"),
    "staleness_reference": ("2025-05-06T07:08:09+00:00", datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC)),
    "mlflow_tracking_uri": ("http://mlflow.internal:5001", "http://mlflow.internal:5001"),
    "model_name": ("other_model", "other_model"),
    "n_estimators": ("11", 11),
    "min_samples_leaf": ("4", 4),
    "compute": ("ray", "ray"),
    "host": ("::1", "::1"),
    "port": ("50999", 50999),
    "model_uri": ("models:/streamflow_churn/1", "models:/streamflow_churn/1"),
    "poll_interval_s": ("0.75", 0.75),
    "registry_timeout_s": ("1.5", 1.5),
    "max_batch_size": ("17", 17),
    "runtime": ("onnx", "onnx"),
    "reflection": ("false", False),
    "threads": ("5", 5),
    "max_concurrent_rpcs": ("9", 9),
    "workers": ("3", 3),
    "grace_s": ("2.5", 2.5),
    "log_level": ("DEBUG", "DEBUG"),
    "log_format": ("json", LogFormat.JSON),
    "tls_cert_file": ("/etc/tls/tls.crt", Path("/etc/tls/tls.crt")),
    "tls_key_file": ("/etc/tls/tls.key", Path("/etc/tls/tls.key")),
    "tls_client_ca_file": ("/etc/tls/ca.crt", Path("/etc/tls/ca.crt")),
    "auth_tokens_file": ("/etc/streamflow/tokens", Path("/etc/streamflow/tokens")),
    "prediction_log_dsn": ("postgresql://u@logs:5432/log", "postgresql://u@logs:5432/log"),
}
# Settings that are only valid beside others (a certificate needs its key): set with them.
COMPANIONS: dict[str, dict[str, str]] = {
    "tls_cert_file": {"STREAMFLOW_TLS_KEY_FILE": "/etc/tls/tls.key"},
    "tls_key_file": {"STREAMFLOW_TLS_CERT_FILE": "/etc/tls/tls.crt"},
    "tls_client_ca_file": {
        "STREAMFLOW_TLS_CERT_FILE": "/etc/tls/tls.crt",
        "STREAMFLOW_TLS_KEY_FILE": "/etc/tls/tls.key",
    },
}


def _non_default(field: str) -> tuple[str, Any]:
    if field in ENVIRONMENT:
        return ENVIRONMENT[field]
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int | float):
        return str(default + 1), default + 1
    raise AssertionError(f"add a non-default environment value for {field} to ENVIRONMENT")


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_each_setting_is_read_from_the_variable_the_readme_names(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, expected = _non_default(field)
    assert expected != Settings.model_fields[field].get_default(call_default_factory=True), (
        "pick a non-default"
    )

    monkeypatch.setenv(_env_name(field), raw)
    for name, value in COMPANIONS.get(field, {}).items():
        monkeypatch.setenv(name, value)

    assert getattr(Settings(), field) == expected


def _setup_commands() -> list[str]:
    section = README.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert block, "the set-up section has no bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def _make_would_run(target: str) -> list[str]:
    """The commands `make <target>` runs on a fresh clone (-B: as if nothing were built; -n: print only)."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _index_of(commands: list[str], pattern: str) -> int:
    found = [i for i, command in enumerate(commands) if re.search(pattern, command)]
    assert found, f"no command matches {pattern!r} in {commands}"
    return found[0]


def test_readme_setup_is_exactly_make_run_and_make_test() -> None:
    assert _setup_commands() == ["make run", "make test"]


def test_make_run_installs_bootstraps_and_then_serves() -> None:
    commands = _make_would_run("run")

    venv = _index_of(commands, r"-m venv \.venv")
    install = _index_of(commands, r"\.venv/bin/pip install .*-e '\.\[dev\]'")
    bootstrap = _index_of(commands, r"\.venv/bin/streamflow bootstrap$")
    serve = _index_of(commands, r"\.venv/bin/streamflow serve$")
    assert venv < install < bootstrap < serve == len(commands) - 1


def test_make_test_installs_lints_and_runs_the_whole_suite() -> None:
    commands = _make_would_run("test")

    install = _index_of(commands, r"\.venv/bin/pip install .*-e '\.\[dev\]'")
    checks = [
        _index_of(commands, pattern)
        for pattern in (r"ruff check \.$", r"ruff format --check \.$", r"mypy \.$")
    ]
    # No -k or paths: the whole suite, in one process or several (xdist's -n and --dist only).
    suite = _index_of(commands, r"\.venv/bin/pytest( -q)?( -n \d+ --dist loadfile)?$")
    assert install < min(checks) and max(checks) < suite
