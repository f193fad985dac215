"""The control plane's side of feature serving: resolves a FeatureService and the online store with Feast
into the plain layout a scoring artifact carries (`server.scoring_artifact`), and owns the validity rules.

Runs where Feast is imported (the supervisor, or a single-process server), never in a scoring worker.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

from feast import FeatureService, FeatureStore, FeatureView, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _redis_key, compute_versioned_name
from feast.infra.online_stores.redis import RedisClient, RedisOnlineStore, RedisType
from feast.infra.online_stores.sqlite import SqliteOnlineStore, _quote_id, _table_id
from feast.infra.provider import get_provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import DESCRIPTOR as VALUE_FILE
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Bool, FeastType, Float32, Float64, Int32, Int64, String
from google.protobuf import descriptor_pb2

from streamflow.errors import StreamflowError
from streamflow.server.domain import FeatureSchema, FeatureType
from streamflow.server.online_rows import entity_key_encoder
from streamflow.server.scoring_artifact import FeatureLayout, FeatureRule, StoreLayout, ViewLayout

JOIN_KEY = "user_id"

VALID_RANGES: dict[str, tuple[float, float]] = {
    "months_active": (0, math.inf),
    "monthly_fee": (0, math.inf),
    "watch_hours_30d": (0, 30 * 24),  # hours in 30 days
    "avg_session_mins_7d": (0, 7 * 24 * 60),  # minutes in 7 days
    "unique_devices_30d": (0, math.inf),
    "skips_7d": (0, math.inf),
    "rebuffer_events_7d": (0, math.inf),
    "failed_payments_90d": (0, math.inf),
    "support_tickets_90d": (0, math.inf),
    "ticket_avg_resolution_hrs_90d": (0, 90 * 24),  # hours in 90 days
}
"""Inclusive valid range of each numeric feature; a feature not listed accepts any finite value."""

VALID_CATEGORIES: dict[str, frozenset[str]] = {
    "net_service": frozenset({"DSL", "Fiber optic", "No"}),
}
"""Accepted values of each string feature; a feature not listed accepts any string."""

# Feast dtype -> served type. Narrower Feast types widen losslessly into the contract's 64-bit types.
_TYPES: dict[FeastType, FeatureType] = {
    Int64: FeatureType.INT64,
    Int32: FeatureType.INT64,
    Float64: FeatureType.DOUBLE,
    Float32: FeatureType.DOUBLE,
    Bool: FeatureType.BOOL,
    String: FeatureType.STRING,
}

# Ids the key encoding must encode exactly as Feast does before it is used: empty, typical, long (a length
# above one byte) and non-ASCII (the length counts UTF-8 bytes, not characters).
PROBE_IDS = ("", "7590-VHVEG", "x" * 300, "ünï-çødé_名前-😀")


class FeatureServiceError(StreamflowError):
    """A model's FeatureService cannot be served (missing in Feast, an unsupported type, a duplicate name, an
    online store the server cannot read)."""


def feature_layout(store: FeatureStore, feature_service: str) -> FeatureLayout:
    """Resolve `feature_service` and the online store; raises FeatureServiceError when it cannot serve."""
    try:
        service: FeatureService = store.get_feature_service(feature_service)
    except Exception as exc:  # Feast raises its own not-found type, registries raise theirs
        raise FeatureServiceError(
            f"FeatureService {feature_service!r} does not resolve in Feast: {exc}"
        ) from exc
    online = get_provider(store.config).online_store
    config = store.config
    schema: list[FeatureSchema] = []
    views: list[ViewLayout] = []
    for projection in service.feature_view_projections:
        view_name = projection.name_to_use()
        view = store.get_feature_view(projection.name)
        names = tuple(field.name for field in projection.features)
        for field in projection.features:
            if field.dtype not in _TYPES:
                raise FeatureServiceError(
                    f"feature {field.name!r} of {view_name} has type {field.dtype}, which the server cannot "
                    f"serve; use one of {', '.join(str(t) for t in _TYPES)}"
                )
            schema.append(FeatureSchema(field.name, _TYPES[field.dtype], view_name))
        ttl = view.ttl if view.ttl and view.ttl > timedelta(0) else None
        views.append(_view_layout(online, config, view, view_name, names, ttl))
    served = [f.name for f in schema]
    if len(set(served)) != len(served) or JOIN_KEY in served:
        raise FeatureServiceError(f"FeatureService {feature_service!r} repeats a feature name: {served}")
    rules = tuple(_rule(f) for f in schema)
    return FeatureLayout(feature_service, tuple(schema), rules, tuple(views), store_layout(config))


def _rule(feature: FeatureSchema) -> FeatureRule:
    """The feature's rule; an infinite bound is none (JSON has no infinity)."""
    low, high = VALID_RANGES.get(feature.name, (-math.inf, math.inf))
    return FeatureRule(
        None if math.isinf(low) else low,
        None if math.isinf(high) else high,
        VALID_CATEGORIES.get(feature.name),
    )


def _view_layout(
    online: object,
    config: RepoConfig,
    view: FeatureView,
    name: str,
    features: tuple[str, ...],
    ttl: timedelta | None,
) -> ViewLayout:
    versioning = config.registry.enable_online_feature_view_versioning
    ttl_s = None if ttl is None else ttl.total_seconds()
    if isinstance(online, SqliteOnlineStore):
        return ViewLayout(
            name, features, ttl_s, sqlite_table=_quote_id(_table_id(config.project, view, versioning))
        )
    assert isinstance(online, RedisOnlineStore)
    # Feast's own field list: mmh3 of "view:feature" per feature, then the view's "_ts:view" field.
    _, fields = online._generate_hset_keys_for_features(
        view, list(features), fv_name_override=compute_versioned_name(view, versioning)
    )
    return ViewLayout(name, features, ttl_s, redis_fields=tuple(_as_bytes(f) for f in fields))


def _as_bytes(field: str | bytes) -> bytes:
    return field.encode() if isinstance(field, str) else field


def store_layout(config: RepoConfig) -> StoreLayout:
    """The online store's connection and key layout, checked against Feast's own functions; raises
    FeatureServiceError for a store or a layout the server does not read."""
    online = get_provider(config).online_store
    version = config.entity_key_serialization_version

    def feast_key(user_id: str) -> bytes:
        key = EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(string_val=user_id)])
        return bytes(serialize_entity_key(key, entity_key_serialization_version=version))

    prefix = feast_key("")[:-4]  # Feast's bytes of "" end with its 4-byte length
    encode = entity_key_encoder(prefix)
    if not all(encode(user_id) == feast_key(user_id) for user_id in PROBE_IDS):
        raise FeatureServiceError(
            f"Feast's entity key serialization (version {version}) is not the layout the server reads"
        )
    descriptor = descriptor_pb2.FileDescriptorProto()
    VALUE_FILE.CopyToProto(descriptor)
    value_descriptor = descriptor.SerializeToString()
    if isinstance(online, SqliteOnlineStore):
        path = Path(SqliteOnlineStore._get_db_path(config)).resolve()
        return StoreLayout("sqlite", prefix, value_descriptor, sqlite_path=str(path))
    online_config = config.online_store
    if not isinstance(online, RedisOnlineStore) or online_config.client != RedisClient.redis:
        raise FeatureServiceError(
            f"the online store {online_config.type!r} is not one the server reads (sqlite, or redis with the "
            "redis-py client)"
        )
    if online_config.redis_type not in (RedisType.redis, RedisType.redis_cluster):
        raise FeatureServiceError(f"Redis type {online_config.redis_type} is not one the server reads")
    nodes, options = online._parse_connection_string(online_config.connection_string)
    suffix = config.project.encode()
    key = _redis_key(
        config.project,
        EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(string_val="7590-VHVEG")]),
        version,
    )
    if key != encode("7590-VHVEG") + suffix:
        raise FeatureServiceError("Feast's Redis key layout is not the one the server reads")
    return StoreLayout(
        "redis",
        prefix,
        value_descriptor,
        redis_cluster=online_config.redis_type == RedisType.redis_cluster,
        redis_nodes=tuple((node["host"], int(node["port"])) for node in nodes),
        redis_options=tuple(sorted(options.items())),
        redis_key_suffix=suffix,
    )
