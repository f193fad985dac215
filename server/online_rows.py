"""Reads the rows of a FeatureService's views from Feast's online store in one round-trip per request.

Feast's `online_read` reads one feature view per call and serializes every entity key again for each view.
For the two stores StreamFlow ships this module reads all views at once, through Feast's own connection,
table names, hash fields and key encoding, and decodes values and event times exactly as Feast's
`online_read` does:

- SQLite: one statement, a `UNION ALL` of every view's table over the requested keys;
- Redis: Feast keeps all views of an entity in one hash, so one HMGET per user, one pipeline per request.

Any other online store is read through Feast's provider, one `online_read` per view (`ProviderRows`).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import struct
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from feast import FeatureView, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _redis_key, compute_versioned_name
from feast.infra.online_stores.redis import RedisClient, RedisOnlineStore
from feast.infra.online_stores.sqlite import SqliteOnlineStore, _quote_id, _table_id
from feast.infra.provider import Provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

log = logging.getLogger(__name__)

Cell = tuple[ValueProto, datetime]
"""A stored feature value and the event time of its row (null and the epoch when the view has no row)."""
NULL = ValueProto()
UNDECODABLE = ValueProto()
"""Stored bytes that are no ValueProto, known by identity: a corrupt cell fails its user only."""
EPOCH = datetime.fromtimestamp(0, UTC)
UNDATED = ValueProto()
"""Every value of a view row whose stored event time does not decode (age unknown), known by identity."""
_BAD_TIME = datetime.fromtimestamp(0, UTC)  # what a decoder returns for such an event time, known by identity

# Ids a fast key encoding must encode exactly as Feast does before it is used: empty, typical, long (a
# length above one byte) and non-ASCII (the length counts UTF-8 bytes, not characters).
PROBE_IDS = ("", "7590-VHVEG", "x" * 300, "ünï-çødé_名前-😀")
_LENGTH = struct.Struct("<I")
_Stored = TypeVar("_Stored", bound=bytes | None)
_Decoded = TypeVar("_Decoded")


@dataclass(frozen=True)
class ViewFeatures:
    """One feature view of the FeatureService and the features the model reads from it, in order."""

    view: FeatureView
    names: tuple[str, ...]


class OnlineRows(Protocol):
    """Reads the cells of distinct users; each user's cells are the views' features in view order."""

    def read(self, user_ids: Sequence[str]) -> list[list[Cell]]: ...


def online_rows(
    provider: Provider, config: RepoConfig, views: Sequence[ViewFeatures], join_key: str
) -> OnlineRows:
    """The reader of the configured store: one round-trip for SQLite and redis-py, per view otherwise."""
    store = provider.online_store
    if isinstance(store, SqliteOnlineStore):
        return SqliteRows(store, config, views, join_key)
    if isinstance(store, RedisOnlineStore) and config.online_store.client == RedisClient.redis:
        # (Feast's GLIDE client batches off the GIL on its own; it stays on the generic path.)
        return RedisRows(store, config, views, join_key)
    return ProviderRows(provider, config, views, join_key)


def entity_key(join_key: str, user_id: str) -> EntityKeyProto:
    """The entity key proto of one user, as the SDK builds it from an entity row."""
    return EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=user_id)])


def entity_key_encoder(join_key: str, config: RepoConfig) -> Callable[[str], bytes]:
    """Feast's `serialize_entity_key` of a single string key, without building protos per user.

    Feast's bytes for one string key are a fixed prefix, the UTF-8 length and the UTF-8 bytes; the prefix is
    taken from Feast's own encoding of "" and the result checked against Feast on `PROBE_IDS`. Should Feast's
    layout ever differ, Feast's function is used instead."""
    version = config.entity_key_serialization_version

    def feast(user_id: str) -> bytes:
        key: bytes = serialize_entity_key(
            entity_key(join_key, user_id), entity_key_serialization_version=version
        )
        return key

    prefix = feast("")[: -_LENGTH.size]

    def direct(user_id: str) -> bytes:
        raw = user_id.encode()
        return prefix + _LENGTH.pack(len(raw)) + raw

    return verified(direct, feast, "entity key serialization")


def verified(
    fast: Callable[[str], bytes], feast: Callable[[str], bytes], what: str
) -> Callable[[str], bytes]:
    """`fast` when it returns Feast's bytes for every probe id, else Feast's own (slower) function."""
    if all(fast(user_id) == feast(user_id) for user_id in PROBE_IDS):
        return fast
    log.warning("%s differs from Feast's on probe ids; using Feast's own function", what)
    return feast


class _DecodedOnce(dict[_Stored, _Decoded]):
    """A request's stored bytes, each distinct one decoded once: users share most values and event times.

    Decoded values are shared between cells, as `NULL` is; nothing mutates a cell."""

    def __init__(self, decode: Callable[[_Stored], _Decoded]) -> None:
        super().__init__()
        self._decode = decode

    def __missing__(self, raw: _Stored) -> _Decoded:
        self[raw] = decoded = self._decode(raw)
        return decoded


def as_utc(event_time: datetime) -> datetime:
    """An online store's event time in UTC; a naive one is UTC already (as Feast's SQLite store reads it)."""
    return event_time.replace(tzinfo=UTC) if event_time.tzinfo is None else event_time.astimezone(UTC)


def _value(raw: bytes | None) -> ValueProto:
    """A stored value; no bytes (no field, or no row of the feature) is null, as Feast reads it."""
    if not raw:
        return NULL
    try:
        return ValueProto.FromString(raw)
    except DecodeError:
        return UNDECODABLE


class SqliteRows:
    """All views of Feast's SQLite store in one statement on Feast's own connection."""

    def __init__(
        self,
        store: SqliteOnlineStore,
        config: RepoConfig,
        views: Sequence[ViewFeatures],
        join_key: str,
    ) -> None:
        self._store = store
        self._config = config
        self._views = views
        self._encode = entity_key_encoder(join_key, config)
        versioning = config.registry.enable_online_feature_view_versioning
        tables = [_quote_id(_table_id(config.project, v.view, versioning)) for v in views]
        # event_ts comes back as its stored bytes (a cast has no declared type, so sqlite3 converts nothing)
        # and goes through the converter Feast registered for the column type, once per distinct value.
        self._selects = [
            f"SELECT {i}, entity_key, feature_name, value, CAST(event_ts AS BLOB) FROM {table} "
            "WHERE entity_key IN"
            for i, table in enumerate(tables)
        ]
        self._statement = functools.lru_cache(maxsize=32)(self._statement_for)
        self._timestamp = sqlite3.converters["TIMESTAMP"]

    def read(self, user_ids: Sequence[str]) -> list[list[Cell]]:
        keys = [self._encode(user_id) for user_id in user_ids]
        statement = self._statement(len(keys))
        # Per view: each key's {feature: stored value} and the event_ts of its last row, which is the one
        # Feast's online_read keeps (both queries walk the same entity_key index, so rows come in one order).
        values: list[defaultdict[bytes, dict[str, bytes]]] = [defaultdict(dict) for _ in self._views]
        stamps: list[dict[bytes, bytes]] = [{} for _ in self._views]
        for i, key, name, value, stamp in self._store._get_conn(self._config).execute(statement, keys):
            values[i][key][name] = value
            stamps[i][key] = stamp
        protos = _DecodedOnce(_value)
        event_times = _DecodedOnce(self._event_time)
        cells: list[list[Cell]] = []
        for key in keys:
            user_cells: list[Cell] = []
            for view, view_values, view_stamps in zip(self._views, values, stamps, strict=True):
                row = view_values.get(key)
                if row is None:  # no row of the view: nulls at the epoch, as the SDK gives for Feast's None
                    user_cells += [(NULL, EPOCH)] * len(view.names)
                else:
                    event_time = event_times[view_stamps[key]]
                    if event_time is _BAD_TIME:
                        user_cells += [(UNDATED, EPOCH)] * len(view.names)
                    else:
                        user_cells += [(protos[row.get(name)], event_time) for name in view.names]
            cells.append(user_cells)
        return cells

    def _statement_for(self, key_count: int) -> str:
        """Every view's rows of `key_count` keys: numbered parameters bind the keys once for all views (a
        `WITH keys AS (VALUES ...)` table instead cost one user 11 µs more to materialize)."""
        keys = ",".join(f"?{n}" for n in range(1, key_count + 1))
        return " UNION ALL ".join(f"{select} ({keys})" for select in self._selects)

    def _event_time(self, raw: bytes) -> datetime:
        try:
            return as_utc(self._timestamp(raw))
        except (ValueError, OverflowError, OSError):  # not a timestamp Feast wrote
            return _BAD_TIME


@dataclass(frozen=True)
class _HashSlice:
    """Where one view's features and timestamp sit in the fields of a user's HMGET."""

    start: int
    stop: int  # the view's timestamp field; its features are [start, stop)


class RedisRows:
    """All views of Feast's Redis store: one HMGET of the user's hash per user, one pipeline per request."""

    def __init__(
        self,
        store: RedisOnlineStore,
        config: RepoConfig,
        views: Sequence[ViewFeatures],
        join_key: str,
    ) -> None:
        self._store = store
        self._config = config
        encode = entity_key_encoder(join_key, config)
        project = config.project.encode()
        version = config.entity_key_serialization_version
        # Feast's key of an entity's hash: its serialized key, then the project's name.
        self._key = verified(
            lambda user_id: encode(user_id) + project,
            lambda user_id: _redis_key(config.project, entity_key(join_key, user_id), version),
            "Redis key encoding",
        )
        self._fields: list[str | bytes] = []
        self._slices: list[_HashSlice] = []
        versioning = config.registry.enable_online_feature_view_versioning
        for v in views:
            # Feast's own field list: mmh3 of "view:feature" per feature, then the view's "_ts:view" field.
            _, fields = store._generate_hset_keys_for_features(
                v.view, list(v.names), fv_name_override=compute_versioned_name(v.view, versioning)
            )
            start = len(self._fields)
            self._fields.extend(fields)
            self._slices.append(_HashSlice(start, len(self._fields) - 1))

    def read(self, user_ids: Sequence[str]) -> list[list[Cell]]:
        client = self._store._get_client(self._config.online_store)
        with client.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.hmget(self._key(user_id), self._fields)
            replies: list[list[bytes | None]] = pipe.execute()
        protos = _DecodedOnce(_value)
        event_times = _DecodedOnce(_redis_event_time)
        cells = [
            [
                (protos[raw], event_times[reply[s.stop]])
                for s in self._slices
                for raw in reply[s.start : s.stop]
            ]
            for reply in replies
        ]
        if any(event_time is _BAD_TIME for event_time in event_times.values()):  # a handful of distinct times
            cells = [[(UNDATED, EPOCH) if at is _BAD_TIME else (v, at) for v, at in row] for row in cells]
        return cells


def _redis_event_time(raw: bytes | None) -> datetime:
    """Feast's decoding of a view's `_ts:` field: no field (no row) is the epoch."""
    stamp = Timestamp()
    try:
        if raw:
            stamp.ParseFromString(raw)
        return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1_000_000_000.0, tz=UTC)
    except (DecodeError, ValueError, OverflowError, OSError):  # not a timestamp Feast wrote
        return _BAD_TIME


class ProviderRows:
    """Any other online store: Feast's provider `online_read`, one call per view."""

    def __init__(
        self, provider: Provider, config: RepoConfig, views: Sequence[ViewFeatures], join_key: str
    ) -> None:
        self._provider = provider
        self._config = config
        self._views = views
        self._join_key = join_key

    def read(self, user_ids: Sequence[str]) -> list[list[Cell]]:
        keys = [entity_key(self._join_key, user_id) for user_id in user_ids]
        cells: list[list[Cell]] = [[] for _ in user_ids]
        for v in self._views:
            # A copy: Feast's Redis store appends its timestamp key to the list it is given.
            rows = self._provider.online_read(self._config, v.view, keys, list(v.names))
            for user_cells, (event_time, values) in zip(cells, rows, strict=True):
                if values is None or event_time is None:
                    user_cells.extend([(NULL, EPOCH)] * len(v.names))
                else:
                    at = as_utc(event_time)
                    user_cells.extend((values.get(name, NULL), at) for name in v.names)
        return cells
