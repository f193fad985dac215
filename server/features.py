"""Reads a model's features from the Feast online store and decides whether they can be scored.

A `FeatureReader` is built once per model from its scoring artifact, in which the control plane wrote down
what it resolved with Feast (the FeatureService's views, their features' types and time-to-live, the online
store's layout, each feature's validity rule), so a request only reads rows and classifies them, and the
reader imports no Feast. Rows come from Feast's own online store, every view in one round-trip per request
(`server.online_rows`; the SDK's `get_online_features` would re-resolve all of that per call and costs
several times more per user), and equal what that SDK call returns. Each requested
user comes back either as a `FeatureRow` or as the `FeatureError` that keeps it from being scored, checked in
this order:

0. a value stored with a type other than the registry declares, bytes that are no Feast value, or a row
   whose event time does not decode (a bug upstream of the server: a loader writing below Feast's typed
   writer): `FeaturesInvalid`, naming the feature and the stored type, never the raw value;
1. every feature null (the store has no row of any view for the user): `EntityNotFound`;
2. some features null: `FeaturesMissing`;
3. staleness: a feature whose event time is older than its view's TTL, measured against
   `settings.staleness_clock()`, is stale (`FeaturesStale`). Feast's online reads do not enforce TTLs, so the
   server does. The clock is `STREAMFLOW_STALENESS_REFERENCE`: an instant (the demo default, a week after the
   last demo snapshot, so the demo's 2024 data is judged as of its own time) or `now` for a live deployment.
   A view without a TTL never goes stale, and an event time in the future is not stale;
4. a value outside its feature's valid range or categories (the artifact's rules), or a non-finite float:
   `FeaturesInvalid`.

Only the first failing check is reported, with every feature that fails it.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import numpy as np
from google.protobuf.message import Message

from streamflow.server import metrics, redis_client
from streamflow.server.domain import FeatureScalar, FeatureSchema, FeatureType, FeatureValue
from streamflow.server.errors import (
    EntityNotFound,
    FeatureError,
    FeatureProblem,
    FeaturesInvalid,
    FeaturesMissing,
    FeaturesStale,
)
from streamflow.server.online_rows import Cell, ValueCodec, online_rows
from streamflow.server.scoring_artifact import FeatureLayout, FeatureRule
from streamflow.server.store_health import StoreBreaker, breaker_for
from streamflow.settings import Settings

# Served type -> the Value fields that may hold it, and the numpy dtype of the model's input column.
_VALUE_FIELDS: dict[FeatureType, tuple[str, ...]] = {
    FeatureType.INT64: ("int64_val", "int32_val"),
    FeatureType.DOUBLE: ("double_val", "float_val"),
    FeatureType.BOOL: ("bool_val",),
    FeatureType.STRING: ("string_val",),
}
_FRAME_DTYPES: dict[FeatureType, str] = {
    FeatureType.INT64: "int64",
    FeatureType.DOUBLE: "float64",
    FeatureType.BOOL: "bool",
    FeatureType.STRING: "object",
}

# The staleness cutoff of a view without a TTL (or with one longer than the calendar): nothing is older.
_NEVER_STALE = datetime.min.replace(tzinfo=UTC)

# What an unreachable online store raises, per store: SQLite (file cannot be opened, locked), Redis (a server
# or a cluster: `server.redis_client`), and sockets in general.
_UNREACHABLE: tuple[type[BaseException], ...] = (sqlite3.OperationalError, *redis_client.UNREACHABLE, OSError)


class _WrongType(Exception):
    """A stored cell the feature's type cannot hold; `_classify` words it for the user's result."""


@dataclass(frozen=True)
class FeatureRow:
    """One user's usable feature values, in the model's feature order."""

    user_id: str
    values: tuple[FeatureValue, ...]


class FeatureReader:
    """Reads and classifies the features of one model; built once per model from its artifact's layout."""

    def __init__(self, layout: FeatureLayout, settings: Settings) -> None:
        self.feature_service = layout.feature_service
        self.schema: tuple[FeatureSchema, ...] = layout.schema
        self._rows = online_rows(layout.store, layout.views)
        self._codec: ValueCodec = self._rows.codec
        store_type = self.store_type = layout.store.kind
        metrics.store_error_series(store_type)  # 0 from the first scrape, so an alert's rate() starts at 0
        self._breaker = breaker_for(
            layout.store.identity,
            lambda: StoreBreaker(store_type, _UNREACHABLE, settings.online_store_probe_interval_s),
        )
        self._ttls = {v.name: None if v.ttl_s is None else timedelta(seconds=v.ttl_s) for v in layout.views}
        self._clock = settings.staleness_clock
        # Resolved per feature, in schema order, so classifying a row looks nothing up by name.
        self._names = tuple(f.name for f in self.schema)
        self._value_of = tuple(_value_reader(f, self._codec) for f in self.schema)
        self._problem_of = tuple(
            _value_rule(f, rule) for f, rule in zip(self.schema, layout.rules, strict=True)
        )

    def read(self, user_ids: Sequence[str]) -> list[FeatureRow | FeatureError]:
        """Each user's row or the reason it cannot be scored, in request order, from one bulk read."""
        cells = self.read_cells(user_ids)
        clock = self._clock()
        cutoffs = self._cutoffs(clock)
        return [
            self._classify(user_id, row, clock, cutoffs) for user_id, row in zip(user_ids, cells, strict=True)
        ]

    def read_cells(self, user_ids: Sequence[str]) -> list[list[Cell]]:
        """Each user's stored cells in schema order, exactly as the SDK's `get_online_features` gives them.

        One read of every view for all distinct users; a view without a row for a user gives null values at
        the epoch, as the SDK does. Raises `FeatureStoreUnavailable` when the store cannot be reached, at
        once while the store's breaker is open (`server.store_health`: one breaker per FeatureStore, shared
        by every model load and thread).
        """
        unique = list(dict.fromkeys(user_ids))
        cells = self._breaker.call(lambda: self._rows.read(unique))
        if len(unique) == len(user_ids):
            return cells
        by_user = dict(zip(unique, cells, strict=True))
        return [by_user[user_id] for user_id in user_ids]

    def columns(self, rows: Sequence[FeatureRow]) -> dict[str, np.ndarray]:
        """The model's input: one array per feature, in FeatureService order, typed as Feast declares it.

        Plain arrays, not a DataFrame: building a DataFrame costs more than scoring a row with ONNX."""
        return {
            f.name: np.array([row.values[i].value for row in rows], dtype=_FRAME_DTYPES[f.type])
            for i, f in enumerate(self.schema)
        }

    def _cutoffs(self, clock: datetime) -> tuple[datetime, ...]:
        """Per feature, the oldest event time still fresh at `clock`, so one comparison per cell decides
        staleness: `event_time < cutoff` is `clock - event_time > ttl`."""
        # In UTC: aware arithmetic in the clock's own zone would follow its wall clock across DST.
        utc = clock.astimezone(UTC)
        by_view = {view: _oldest_fresh(utc, ttl) for view, ttl in self._ttls.items()}
        return tuple(by_view[f.feature_view] for f in self.schema)

    def _classify(
        self, user_id: str, row: list[Cell], clock: datetime, cutoffs: tuple[datetime, ...]
    ) -> FeatureRow | FeatureError:
        try:
            values = [value_of(proto) for value_of, (proto, _) in zip(self._value_of, row, strict=True)]
        except _WrongType:  # one user's corrupt row fails that user only, never the batch
            wrong = [
                problem
                for f, (proto, _) in zip(self.schema, row, strict=True)
                if (problem := _type_problem(f, proto, self._codec)) is not None
            ]
            return FeaturesInvalid(user_id, wrong)
        times = [event_time for _, event_time in row]
        # Each check is one pass over the row; the problems are worded only for a row that fails it.
        if None in values:
            missing = [
                FeatureProblem(f.name, f.feature_view, f"no value in feature view {f.feature_view}")
                for f, value in zip(self.schema, values, strict=True)
                if value is None
            ]
            if len(missing) == len(values):
                return EntityNotFound(user_id, missing)
            return FeaturesMissing(user_id, missing)
        present = cast(list[FeatureScalar], values)  # None was ruled out just above
        if any(event_time < cutoff for event_time, cutoff in zip(times, cutoffs, strict=True)):
            stale = [
                problem
                for f, event_time in zip(self.schema, times, strict=True)
                if (problem := self._staleness(f, event_time, clock)) is not None
            ]
            return FeaturesStale(user_id, stale)
        invalid = [
            problem
            for problem_of, value in zip(self._problem_of, present, strict=True)
            if (problem := problem_of(value)) is not None
        ]
        if invalid:
            return FeaturesInvalid(user_id, invalid)
        return FeatureRow(user_id, tuple(map(FeatureValue, self._names, present, times)))

    def _staleness(
        self, feature: FeatureSchema, event_time: datetime, clock: datetime
    ) -> FeatureProblem | None:
        ttl = self._ttls[feature.feature_view]
        if ttl is None or clock - event_time <= ttl:
            return None
        age_days = (clock - event_time) / timedelta(days=1)
        return FeatureProblem(
            feature.name,
            feature.feature_view,
            f"event time {event_time.isoformat()} is {age_days:.1f} days before {clock.isoformat()}; "
            f"feature view {feature.feature_view} trusts values for {ttl / timedelta(days=1):g} days",
        )


def _oldest_fresh(clock: datetime, ttl: timedelta | None) -> datetime:
    """The oldest event time a view with this TTL still trusts at `clock`."""
    if ttl is None:
        return _NEVER_STALE
    try:
        return clock - ttl
    except OverflowError:  # a TTL reaching before year 1
        return _NEVER_STALE


def _value_reader(feature: FeatureSchema, codec: ValueCodec) -> Callable[[Message], FeatureScalar | None]:
    """The Python value of a stored cell, or None when null; raises `_WrongType` for a value of another type
    or undecodable bytes (a bug upstream)."""
    fields = _VALUE_FIELDS[feature.type]

    def value_of(proto: Message) -> FeatureScalar | None:
        kind = proto.WhichOneof("val")
        if kind in fields:
            value: FeatureScalar = getattr(proto, kind)
            return value
        if (
            (kind is None or kind == "null_val")
            and proto is not codec.undecodable
            and proto is not codec.undated
        ):
            return None
        raise _WrongType

    return value_of


def _type_problem(feature: FeatureSchema, proto: Message, codec: ValueCodec) -> FeatureProblem | None:
    """What is wrong with the stored type of a cell, or None when `_value_reader` accepts it. The raw value
    stays out: it is corrupt data of unknown size and content, not something to echo to callers."""
    fields = _VALUE_FIELDS[feature.type]
    kind = proto.WhichOneof("val")
    if proto is codec.undated:
        return FeatureProblem(
            feature.name,
            feature.feature_view,
            f"the event time of feature view {feature.feature_view}'s row does not decode, so the value's "
            "age is unknown; write the row again",
        )
    if proto is codec.undecodable:
        stored = "bytes that do not decode as a Feast value"
    elif kind is None or kind == "null_val" or kind in fields:
        return None
    else:
        stored = f"a {kind}"
    return FeatureProblem(
        feature.name,
        feature.feature_view,
        f"the online store holds {stored} for this {feature.type} feature, which Feast stores as "
        f"{' or '.join(fields)}; write the row again with the registered type",
    )


def _value_rule(
    feature: FeatureSchema, rule: FeatureRule
) -> Callable[[FeatureScalar], FeatureProblem | None]:
    """The problem of a value of the feature, or None when it is valid; resolved once per model load.

    The feature's type decides which checks apply: only a DOUBLE holds floats (finiteness), only INT64 and
    DOUBLE are ranged (a bool is not), any feature may list categories. A valid value, the common case, costs
    three comparisons and builds nothing."""
    finite = feature.type is FeatureType.DOUBLE
    ranged = feature.type in (FeatureType.INT64, FeatureType.DOUBLE)
    low = -math.inf if rule.low is None else rule.low
    high = math.inf if rule.high is None else rule.high
    allowed = rule.categories

    def problem_of(value: Any) -> FeatureProblem | None:  # a value of the feature's type (`_value_reader`)
        if finite and not math.isfinite(value):
            return FeatureProblem(feature.name, feature.feature_view, f"{value} is not a finite number")
        if ranged and not low <= value <= high:
            return FeatureProblem(
                feature.name, feature.feature_view, f"{value} is outside the valid range [{low:g}, {high:g}]"
            )
        if allowed is not None and value not in allowed:
            return FeatureProblem(
                feature.name, feature.feature_view, f"{value!r} is not one of: {', '.join(sorted(allowed))}"
            )
        return None

    return problem_of
