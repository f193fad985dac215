"""The README is the front door: it must document every setting with its real default."""

import re
from enum import Enum
from pathlib import Path

import pytest

from streamflow.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _env_name(field: str) -> str:
    return "MLFLOW_TRACKING_URI" if field == "mlflow_tracking_uri" else f"STREAMFLOW_{field.upper()}"


def _row(env: str) -> str:
    match = re.search(rf"^\| `{env}` \|.*$", README, flags=re.MULTILINE)
    assert match, f"README's settings table has no row for {env}"
    return match.group(0)


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_has_a_readme_row_with_its_default(field: str) -> None:
    row = _row(_env_name(field))
    default = Settings.model_fields[field].default
    if isinstance(default, bool):
        assert f"`{str(default).lower()}`" in row
    elif isinstance(default, Enum):
        assert f"`{default.value}`" in row
    elif isinstance(default, int | float | str):
        assert f"`{default}`" in row


def test_readme_shows_the_two_setup_commands() -> None:
    assert "make run" in README and "make test" in README
