"""Where the offline steps run: in this process (`local`), or on Ray (`ray`, `STREAMFLOW_COMPUTE`).

On Ray, Feast's own Ray support does the Feast work (`feature_repo.store.repo_config`): its Ray compute engine
(`batch_engine: ray.engine`) materializes, and its Ray offline store (`offline_store: ray`) runs
`get_historical_features` over the embedded profile's Parquet sources; `score-all` scores on Ray Data.

The Ray instance is the one `RAY_ADDRESS` names (Ray's own variable: `ray://head:10001`, or `auto` for the
cluster of this node, e.g. a KubeRay pod), else a local instance started for the command and stopped after
it. A process that already runs Ray (`ray.init` done, as tests do) keeps its instance.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from streamflow.errors import StreamflowError
from streamflow.settings import Settings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""How long the Ray head `RAY_ADDRESS` names has to accept a connection."""


class Compute(StrEnum):
    """Where offline steps run."""

    LOCAL = "local"
    RAY = "ray"


def ray_offline_store(settings: Settings) -> dict[str, Any]:
    """Feast's Ray offline store over the embedded profile's Parquet sources."""
    return {
        "type": "ray",
        "storage_path": str(settings.feast_dir / "ray-storage"),
        "ray_address": _address(),
        # One partition per CPU and join in Ray Data without broadcasting the whole feature table.
        "max_parallelism_multiplier": 1,
    }


def ray_engine(settings: Settings) -> dict[str, Any]:
    """Feast's Ray compute engine (materialization)."""
    return {
        "type": "ray.engine",
        "ray_address": _address(),
        "staging_location": str(settings.home.resolve() / "ray-staging"),
        "max_parallelism_multiplier": 1,
    }


def _address() -> str | None:
    return os.environ.get("RAY_ADDRESS") or None


def _unreachable(address: str) -> str | None:
    """Why nothing listens at the Ray head `address` names (`host:port`, or `ray://host:port` for Ray
    Client), or None; `auto` and `local` name no host, and Ray reports on them itself."""
    if address in ("auto", "local"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return "expected host:port, ray://host:port, auto or local"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"connecting to {host}:{port}: {exc.strerror or exc}"
    return None


@contextmanager
def ray_session(compute: Compute) -> Iterator[None]:
    """Ray, connected for the duration of the block when `compute` is `ray`; nothing otherwise."""
    if compute is not Compute.RAY:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    address = _address()
    log.info("starting Ray (%s)", f"cluster at {address}" if address else "a local instance")
    if address is not None and (problem := _unreachable(address)) is not None:
        # Checked first: Ray itself retries an absent head for minutes, saying nothing to the caller.
        raise StreamflowError(
            f"Cannot reach Ray at RAY_ADDRESS={address} ({problem}); start the cluster, or unset "
            "RAY_ADDRESS to run on a local Ray instance."
        )
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise StreamflowError(f"Ray at RAY_ADDRESS={address} does not answer: {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()
