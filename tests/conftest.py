"""Fixtures shared by the whole suite; each fixtures module belongs to the package it exercises."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.production import *  # noqa: F403
from tests.fixtures.serving import *  # noqa: F403
from tests.fixtures.training import *  # noqa: F403

# MLflow falls back to ./mlflow.db and ./mlruns when a code path forgets the configured tracking URI; such a
# path would silently read or write the wrong registry, so the suite fails if one appears.
_STRAY_MLFLOW_STORES = ("mlflow.db", "mlruns")


@pytest.fixture(autouse=True, scope="session")
def no_stray_mlflow_store() -> Iterator[None]:
    """Fail the run when anything under test created MLflow's default store in the working directory."""
    before = {name for name in _STRAY_MLFLOW_STORES if Path(name).exists()}
    yield
    created = [name for name in _STRAY_MLFLOW_STORES if Path(name).exists() and name not in before]
    assert not created, f"a code path used MLflow's default store instead of the configured one: {created}"
