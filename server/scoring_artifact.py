"""The self-contained scoring artifact the control plane hands the scoring workers.

The control plane (the supervisor, or the one process of a single-process server) alone talks to MLflow and
Feast: it resolves a version, its FeatureService and the online store's layout, validates the model, and
writes down everything scoring needs as plain data. A worker builds its model and its feature reader from
this artifact alone, so it imports neither MLflow, Feast, pandas nor (serving ONNX) scikit-learn:

- the model: nothing more for the forest runtime (it scores with the explainer's arrays below), else the ONNX
  export's bytes, or the scikit-learn pipeline pickled (the fallback runtime);
- the feature specification: the features in the model's order with their types, views and TTLs;
- the validity rules: each feature's valid range or categories;
- the online store's layout: where each view's rows live (SQLite tables, Redis hash fields), how an entity key
  is encoded, how to connect, and the descriptor of Feast's `Value` message the cells are stored as;
- what ModelInfo reports: the version, its run, metrics and provenance;
- the forest flattened for explanations and the forest runtime (server/explanations.py), when the model is
  one.

On disk it is a directory: `artifact.json`, the model file and the explainer's arrays (`explainer/`, mapped
read-only by workers) beside it, written once and never changed.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamflow.server.domain import FeatureSchema, FeatureType, ModelRef, Runtime
from streamflow.server.explanations import ForestArrays

SPEC_FILE = "artifact.json"
MODEL_FILES = {Runtime.ONNX: "model.onnx", Runtime.SKLEARN: "model.pkl"}
"""The model's file per runtime; the forest runtime has none of its own (it reads the explainer's arrays)."""
EXPLAINER_DIR = "explainer"


@dataclass(frozen=True)
class FeatureRule:
    """What a valid value of one feature is: inclusive bounds (numbers) and allowed values (strings)."""

    low: float | None = None
    high: float | None = None
    categories: frozenset[str] | None = None


@dataclass(frozen=True)
class ViewLayout:
    """One feature view of the FeatureService as the online store keeps it."""

    name: str
    """The name the FeatureService gives the view (what errors and schema report)."""
    features: tuple[str, ...]
    """The features the model reads from it, in the model's order."""
    ttl_s: float | None
    """How long its values are trusted, in seconds; None never goes stale."""
    sqlite_table: str | None = None
    """SQLite: the view's table, quoted."""
    redis_fields: tuple[bytes, ...] = ()
    """Redis: the hash fields of its features, then its event-time field."""


@dataclass(frozen=True)
class StoreLayout:
    """How to reach the online store and encode a user's key."""

    kind: str
    """`sqlite` or `redis` (Feast's online store type, as metrics label it)."""
    entity_key_prefix: bytes
    """Feast's serialized entity key of a user is this prefix, the UTF-8 length (4 bytes LE) and the id."""
    value_descriptor: bytes
    """The serialized FileDescriptorProto of Feast's `feast.types.Value`, the type of every stored cell."""
    sqlite_path: str | None = None
    redis_cluster: bool = False
    redis_nodes: tuple[tuple[str, int], ...] = ()
    redis_options: tuple[tuple[str, Any], ...] = ()
    """redis-py connection keyword arguments (db, password, ssl, timeouts, ...), as Feast parses them."""
    redis_key_suffix: bytes = b""
    """Feast's key of a user's hash is the serialized entity key followed by this (the project)."""

    @property
    def identity(self) -> str:
        """Which store this is, whatever model reads it: its reads share one circuit breaker."""
        if self.kind == "sqlite":
            return f"sqlite:{self.sqlite_path}"
        return f"redis:{sorted(self.redis_nodes)}:{dict(self.redis_options).get('db', 0)}"


@dataclass(frozen=True)
class FeatureLayout:
    """A FeatureService as scoring reads it: its features, their rules, its views and the store."""

    feature_service: str
    schema: tuple[FeatureSchema, ...]
    rules: tuple[FeatureRule, ...]
    """One per feature of `schema`, in its order."""
    views: tuple[ViewLayout, ...]
    store: StoreLayout


@dataclass(frozen=True)
class ScoringArtifact:
    """A validated model version and everything a worker needs to score with it."""

    ref: ModelRef
    stage: str
    aliases: tuple[str, ...]
    run_id: str
    model_uri: str
    training_as_of: str
    metrics: dict[str, float]
    layout: FeatureLayout
    runtime: Runtime
    model: bytes | Path
    """The model's bytes, or the file that holds them (an artifact read from disk): onnxruntime reads a file
    itself, without the 18 MB copy of the demo model's bytes it keeps when handed them. Empty for the forest
    runtime, which scores with `explainer`'s arrays."""
    explainer: ForestArrays | None = None
    """The forest as TreeSHAP and the forest runtime read it; None when the model cannot be explained."""

    def model_bytes(self) -> bytes:
        return self.model if isinstance(self.model, bytes) else self.model.read_bytes()

    def write(self, directory: Path) -> Path:
        """Write the artifact into `directory` (created, private to this user); returns it."""
        directory.mkdir(mode=0o700, parents=True)
        if self.runtime in MODEL_FILES:
            (directory / MODEL_FILES[self.runtime]).write_bytes(self.model_bytes())
        if self.explainer is not None:
            self.explainer.save(directory / EXPLAINER_DIR)
        spec = _encode({k: v for k, v in vars(self).items() if k not in {"model", "explainer"}})
        temporary = directory / f".{SPEC_FILE}"
        temporary.write_text(json.dumps(spec))
        os.replace(temporary, directory / SPEC_FILE)  # a reader sees the whole spec or none
        return directory

    @classmethod
    def read(cls, directory: Path) -> ScoringArtifact:
        """The artifact written into `directory`, its model left in its file; raises OSError or ValueError
        when it is not one."""
        spec = json.loads((directory / SPEC_FILE).read_text())
        runtime = Runtime(spec["runtime"])
        return cls(
            ref=ModelRef(**spec["ref"]),
            stage=spec["stage"],
            aliases=tuple(spec["aliases"]),
            run_id=spec["run_id"],
            model_uri=spec["model_uri"],
            training_as_of=spec["training_as_of"],
            metrics={k: float(v) for k, v in spec["metrics"].items()},
            layout=_layout(spec["layout"]),
            runtime=runtime,
            model=_existing(directory / MODEL_FILES[runtime]) if runtime in MODEL_FILES else b"",
            explainer=ForestArrays.load(directory / EXPLAINER_DIR)
            if (directory / EXPLAINER_DIR).is_dir()
            else None,
        )


def _layout(spec: dict[str, Any]) -> FeatureLayout:
    store = spec["store"]
    return FeatureLayout(
        feature_service=spec["feature_service"],
        schema=tuple(
            FeatureSchema(f["name"], FeatureType(f["type"]), f["feature_view"]) for f in spec["schema"]
        ),
        rules=tuple(
            FeatureRule(r["low"], r["high"], None if r["categories"] is None else frozenset(r["categories"]))
            for r in spec["rules"]
        ),
        views=tuple(
            ViewLayout(
                v["name"],
                tuple(v["features"]),
                v["ttl_s"],
                v["sqlite_table"],
                tuple(_bytes(f) for f in v["redis_fields"]),
            )
            for v in spec["views"]
        ),
        store=StoreLayout(
            kind=store["kind"],
            entity_key_prefix=_bytes(store["entity_key_prefix"]),
            value_descriptor=_bytes(store["value_descriptor"]),
            sqlite_path=store["sqlite_path"],
            redis_cluster=store["redis_cluster"],
            redis_nodes=tuple((host, int(port)) for host, port in store["redis_nodes"]),
            redis_options=tuple((k, v) for k, v in store["redis_options"]),
            redis_key_suffix=_bytes(store["redis_key_suffix"]),
        ),
    )


def _encode(value: Any) -> Any:
    """The JSON-able form of the artifact's data: bytes as {"b64": ...}, sets sorted, dataclasses as dicts."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _encode(v) for k, v in vars(value).items()}
    return value


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"no model file {path.name} in the artifact")
    return path


def _bytes(value: dict[str, str]) -> bytes:
    return base64.b64decode(value["b64"])
