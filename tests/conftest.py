"""Fixtures shared by the whole suite; each fixtures module belongs to the package it exercises."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.tracking._model_registry.utils as mlflow_registry_utils
import pytest

from streamflow.server.logs import StderrHandler
from tests.fixtures.production import *  # noqa: F403
from tests.fixtures.redis_cluster import *  # noqa: F403
from tests.fixtures.serving import *  # noqa: F403
from tests.fixtures.training import *  # noqa: F403

# MLflow falls back to ./mlflow.db and ./mlruns when a code path forgets the configured tracking URI; such a
# path would silently read or write the wrong registry, so the suite fails if one appears.
_STRAY_MLFLOW_STORES = ("mlflow.db", "mlruns", "mlflow/mlflow.db")  # the last: a home of "."
# A developer's exported settings (and MLflow's and Ray's own variables) would change what the tests test.
_SETTING_PREFIXES = ("STREAMFLOW_", "MLFLOW_", "RAY_ADDRESS")

# `make test` runs the suite with xdist's `--dist loadfile`, which hands out test files in collection order: a
# process that draws one of the longest files last ends the run alone. They go first. Per-file totals of one
# run (--durations=0, 2026-12-02, 1,943 s in all): test_workers 254 s, test_ray 226 s, test_production_e2e
# 118 s, test_shadow 105 s, test_logs 104 s; the next is 87 s.
_LONGEST_FILES = (
    "test_workers.py",
    "test_ray.py",
    "test_production_e2e.py",
    "test_shadow.py",
    "test_logs.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first; every other file, and the tests within a file, keep their order."""
    rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def no_stray_mlflow_store() -> Iterator[None]:
    """Fail the run when anything under test created MLflow's default store in the working directory."""
    before = {name for name in _STRAY_MLFLOW_STORES if Path(name).exists()}
    yield
    created = [name for name in _STRAY_MLFLOW_STORES if Path(name).exists() and name not in before]
    assert not created, f"a code path used MLflow's default store instead of the configured one: {created}"


@pytest.fixture(autouse=True, scope="session")
def no_settings_from_the_shell() -> Iterator[None]:
    """Run the suite without the shell's STREAMFLOW_* and MLFLOW_* variables: every setting a test depends
    on is its own. (The machine's PostgreSQL and Redis addresses were read at import by
    tests.fixtures.production, which is where the suite is told about them.)"""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith(_SETTING_PREFIXES)]:
            patch.delenv(name)
        yield


@pytest.fixture(autouse=True)
def no_mlflow_globals_between_tests() -> Iterator[None]:
    """Forget MLflow's process-wide tracking and registry URIs after each test.

    `training.train.mlflow_client` points MLflow's fluent API at a registry (training needs it), and
    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI for subprocesses. Left in place, a later
    test's `models:/` load or child process would silently use whichever registry ran last.
    """
    yield
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None is how MLflow unsets it
    mlflow_registry_utils._registry_uri = None
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(name, None)


@pytest.fixture(autouse=True)
def no_log_handlers_between_tests() -> Iterator[None]:
    """Undo what a CLI command run in-process did to the root logger (`configure_logging` installs the
    server's stderr handler and level for the whole process): later tests' servers would log through it."""
    root = logging.getLogger()
    handlers, level = set(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers and isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)
