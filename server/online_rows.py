"""Reads the rows of a FeatureService's views from Feast's online store, in one round-trip per request,
without Feast.

Feast's `online_read` reads one feature view per call and serializes every entity key again for each view.
This module reads all views at once, from the layout the control plane resolved with Feast
(`server.scoring_artifact.StoreLayout`: tables, hash fields, key encoding, connection), and decodes values and
event times exactly as Feast's `online_read` does:

- SQLite: one statement, a `UNION ALL` of every view's table over the requested keys;
- Redis (one server or a Redis Cluster): Feast keeps all views of an entity in one hash, so one HMGET per
  user, all in one pipeline per request (a cluster pipeline sends one batch to each master).

Cells are Feast `Value` messages, built from the descriptor the artifact carries in a descriptor pool of this
module's own, so a worker never imports Feast and a process that does (the control plane) has no clash.
"""

from __future__ import annotations

import functools
import sqlite3
import struct
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from streamflow.server.redis_client import HashReader
from streamflow.server.scoring_artifact import StoreLayout, ViewLayout

VALUE_TYPE = "feast.types.Value"

Cell = tuple[Message, datetime]
"""A stored feature value (a Feast `Value`) and the event time of its row (null and the epoch when the view
has no row)."""
EPOCH = datetime.fromtimestamp(0, UTC)
_BAD_TIME = datetime.fromtimestamp(0, UTC)  # what a decoder returns for such an event time, known by identity
_LENGTH = struct.Struct("<I")
_Stored = TypeVar("_Stored", bound=bytes | None)
_Decoded = TypeVar("_Decoded")
_Made = TypeVar("_Made")


class ValueCodec:
    """Feast's `Value` message type and the three cells known by identity."""

    def __init__(self, descriptor: bytes) -> None:
        pool = descriptor_pool.DescriptorPool()
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(descriptor))
        self.message: Callable[..., Message] = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(VALUE_TYPE)
        )
        self.null = self.message()
        self.undecodable = self.message()
        """Stored bytes that are no Value: a corrupt cell fails its user only."""
        self.undated = self.message()
        """Every value of a view row whose stored event time does not decode (age unknown)."""

    def decode(self, raw: bytes | None) -> Message:
        """A stored value; no bytes (no field, or no row of the feature) is null, as Feast reads it."""
        if not raw:
            return self.null
        try:
            value = self.message()
            value.ParseFromString(raw)
            return value
        except DecodeError:
            return self.undecodable


@functools.cache
def value_codec(descriptor: bytes) -> ValueCodec:
    """One codec per descriptor: every model of a process reading the same Feast shares its cells' type."""
    return ValueCodec(descriptor)


class OnlineRows(Protocol):
    """Reads the cells of distinct users; each user's cells are the views' features in view order."""

    codec: ValueCodec

    def read(self, user_ids: Sequence[str]) -> list[list[Cell]]: ...


def online_rows(store: StoreLayout, views: Sequence[ViewLayout]) -> OnlineRows:
    """The reader of the store the layout describes."""
    if store.kind == "sqlite":
        return SqliteRows(store, views)
    return RedisRows(store, views)


def entity_key_encoder(prefix: bytes) -> Callable[[str], bytes]:
    """Feast's serialized entity key of a single string key: a fixed prefix, the UTF-8 length and the UTF-8
    bytes (the control plane checked the layout against Feast's own function)."""

    def encode(user_id: str) -> bytes:
        raw = user_id.encode()
        return prefix + _LENGTH.pack(len(raw)) + raw

    return encode


class _DecodedOnce(dict[_Stored, _Decoded]):
    """A request's stored bytes, each distinct one decoded once: users share most values and event times.

    Decoded values are shared between cells, as the null cell is; nothing mutates a cell."""

    def __init__(self, decode: Callable[[_Stored], _Decoded]) -> None:
        super().__init__()
        self._decode = decode

    def __missing__(self, raw: _Stored) -> _Decoded:
        self[raw] = decoded = self._decode(raw)
        return decoded


def as_utc(event_time: datetime) -> datetime:
    """An online store's event time in UTC; a naive one is UTC already (as Feast's SQLite store reads it)."""
    return event_time.replace(tzinfo=UTC) if event_time.tzinfo is None else event_time.astimezone(UTC)


class _Lazy(Generic[_Made]):
    """A store connection made on the first read, so an unreachable store fails reads (which the breaker
    counts) rather than the model load, as Feast's own connections do. Made once, whichever thread asks."""

    def __init__(self, make: Callable[[], _Made]) -> None:
        self._make = make
        self._made: _Made | None = None
        self._lock = threading.Lock()

    def get(self) -> _Made:
        made = self._made
        if made is None:
            with self._lock:
                made = self._made
                if made is None:
                    made = self._made = self._make()
        return made


class SqliteRows:
    """All views of Feast's SQLite store in one statement."""

    def __init__(self, store: StoreLayout, views: Sequence[ViewLayout]) -> None:
        path = store.sqlite_path
        assert path is not None
        self.codec = value_codec(store.value_descriptor)
        self._views = views
        self._encode = entity_key_encoder(store.entity_key_prefix)
        self._connection = _Lazy(lambda: sqlite3.connect(path, check_same_thread=False))
        # event_ts comes back as its stored bytes (a cast has no declared type, so sqlite3 converts nothing)
        # and is decoded as Feast's converter does, once per distinct value.
        self._selects = [
            f"SELECT {i}, entity_key, feature_name, value, CAST(event_ts AS BLOB) FROM {v.sqlite_table} "
            "WHERE entity_key IN"
            for i, v in enumerate(views)
        ]
        self._statement = functools.lru_cache(maxsize=32)(self._statement_for)

    def read(self, user_ids: Sequence[str]) -> list[list[Cell]]:
        keys = [self._encode(user_id) for user_id in user_ids]
        statement = self._statement(len(keys))
        # Per view: each key's {feature: stored value} and the event_ts of its last row, which is the one
        # Feast's online_read keeps (both queries walk the same entity_key index, so rows come in one order).
        values: list[defaultdict[bytes, dict[str, bytes]]] = [defaultdict(dict) for _ in self._views]
        stamps: list[dict[bytes, bytes]] = [{} for _ in self._views]
        for i, key, name, value, stamp in self._connection.get().execute(statement, keys):
            values[i][key][name] = value
            stamps[i][key] = stamp
        codec = self.codec
        protos = _DecodedOnce(codec.decode)
        event_times = _DecodedOnce(_sqlite_event_time)
        cells: list[list[Cell]] = []
        for key in keys:
            user_cells: list[Cell] = []
            for view, view_values, view_stamps in zip(self._views, values, stamps, strict=True):
                row = view_values.get(key)
                if row is None:  # no row of the view: nulls at the epoch, as the SDK gives for Feast's None
                    user_cells += [(codec.null, EPOCH)] * len(view.features)
                else:
                    event_time = event_times[view_stamps[key]]
                    if event_time is _BAD_TIME:
                        user_cells += [(codec.undated, EPOCH)] * len(view.features)
                    else:
                        user_cells += [(protos[row.get(name)], event_time) for name in view.features]
            cells.append(user_cells)
        return cells

    def _statement_for(self, key_count: int) -> str:
        """Every view's rows of `key_count` keys: numbered parameters bind the keys once for all views (a
        `WITH keys AS (VALUES ...)` table instead cost one user 11 µs more to materialize)."""
        keys = ",".join(f"?{n}" for n in range(1, key_count + 1))
        return " UNION ALL ".join(f"{select} ({keys})" for select in self._selects)


def _sqlite_event_time(raw: bytes) -> datetime:
    """Feast's SQLite converter of `event_ts` (epoch seconds, read as a naive time), in UTC."""
    try:
        return as_utc(datetime.fromtimestamp(int(raw)))
    except (ValueError, OverflowError, OSError):  # not a timestamp Feast wrote
        return _BAD_TIME


@dataclass(frozen=True)
class _HashSlice:
    """Where one view's features and timestamp sit in the fields of a user's HMGET."""

    start: int
    stop: int  # the view's timestamp field; its features are [start, stop)


class RedisRows:
    """All views of Feast's Redis store: one HMGET of the user's hash per user, one pipeline per request."""

    def __init__(self, store: StoreLayout, views: Sequence[ViewLayout]) -> None:
        self.codec = value_codec(store.value_descriptor)
        # One Redis server or a Redis Cluster, connected at the first read, never retrying.
        self._hashes = HashReader(
            store.redis_nodes, cluster=store.redis_cluster, options=dict(store.redis_options)
        )
        encode = entity_key_encoder(store.entity_key_prefix)
        suffix = store.redis_key_suffix
        # Feast's key of an entity's hash: its serialized key, then the project's name.
        self._key: Callable[[str], bytes] = lambda user_id: encode(user_id) + suffix
        self._fields: list[bytes] = []
        self._slices: list[_HashSlice] = []
        for v in views:
            # Feast's own field list: mmh3 of "view:feature" per feature, then the view's "_ts:view" field.
            start = len(self._fields)
            self._fields.extend(v.redis_fields)
            self._slices.append(_HashSlice(start, len(self._fields) - 1))

    def read(self, user_ids: Sequence[str]) -> list[list[Cell]]:
        replies = self._hashes.hmget([self._key(user_id) for user_id in user_ids], self._fields)
        codec = self.codec
        protos = _DecodedOnce(codec.decode)
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
            cells = [
                [(codec.undated, EPOCH) if at is _BAD_TIME else (v, at) for v, at in row] for row in cells
            ]
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
