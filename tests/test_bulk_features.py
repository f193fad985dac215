"""The server's bulk feature read returns exactly what the Feast SDK's `get_online_features` returns.

Rows are written straight into the online store (SQLite, and Redis when it runs), so the cases are exact: a
user with every view, one with some views only, one with null values, one with invalid values, an unknown user
and a repeated user. Each store is read both ways the server can: its one-round-trip reader and Feast's
per-view `online_read`, which any other online store gets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feast import FeatureStore, FeatureView, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.passthrough_provider import PassthroughProvider
from feast.infra.provider import Provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

import streamflow.server.features
import streamflow.server.online_rows
from streamflow.feature_repo.definitions import (
    FEATURE_SERVICE_NAME,
    JOIN_KEY,
    build_feature_service,
    build_views,
    user,
)
from streamflow.feature_repo.production import redis_connection_string
from streamflow.feature_repo.store import embedded_repo_config
from streamflow.server.errors import (
    EntityNotFound,
    FeaturesInvalid,
    FeaturesMissing,
    FeaturesStale,
    FeatureStoreUnavailable,
)
from streamflow.server.features import FeatureReader, FeatureRow
from streamflow.server.online_rows import (
    PROBE_IDS,
    OnlineRows,
    ProviderRows,
    ViewFeatures,
    entity_key_encoder,
)
from streamflow.settings import Settings

FEB = datetime(2024, 2, 29, tzinfo=UTC)
JAN_NOON = datetime(2024, 1, 31, 12, 30, tzinfo=UTC)
REQUEST = ["7590-VHVEG", "PART-ONLY", "WITH-NULLS", "OUT-OF-RANGE", "9999-99999", "7590-VHVEG"]


def _write_cases(store: FeatureStore) -> None:
    views = {view.name: [f.name for f in view.features] for view in store.list_feature_views()}

    def write(view: str, rows: dict[str, list[object]], at: list[datetime]) -> None:
        frame = pd.DataFrame({JOIN_KEY: rows.pop(JOIN_KEY), "as_of": at, **rows})
        assert sorted(rows) == sorted(views[view])
        store.write_to_online_store(view, frame)

    write(
        "subscription_profile_fv",
        {
            JOIN_KEY: ["7590-VHVEG", "PART-ONLY", "WITH-NULLS", "OUT-OF-RANGE"],
            "months_active": [3, 4, 5, 6],
            "monthly_fee": [9.5, 12.25, np.nan, np.inf],
            "paperless_billing": [True, False, None, True],
            "plan_stream_tv": [True, True, False, True],
            "plan_stream_movies": [False, True, False, True],
            "net_service": ["DSL", "Fiber optic", None, "Cable"],
        },
        [FEB, FEB, JAN_NOON, FEB],
    )
    write(
        "usage_agg_30d_fv",
        {
            JOIN_KEY: ["7590-VHVEG", "WITH-NULLS", "OUT-OF-RANGE"],
            "watch_hours_30d": [1.5, np.nan, 1000.0],
            "avg_session_mins_7d": [2.0, 3.5, 4.0],
            "unique_devices_30d": [1, 2, 3],
            "skips_7d": [2, 0, -1],
            "rebuffer_events_7d": [0, 1, 0],
        },
        [JAN_NOON, FEB, FEB],
    )
    write(
        "payments_agg_90d_fv",
        {JOIN_KEY: ["7590-VHVEG", "WITH-NULLS", "OUT-OF-RANGE"], "failed_payments_90d": [0, 1, 0]},
        [FEB, FEB, FEB],
    )
    write(
        "support_agg_90d_fv",
        {
            JOIN_KEY: ["7590-VHVEG", "OUT-OF-RANGE"],
            "support_tickets_90d": [2, 0],
            "ticket_avg_resolution_hrs_90d": [4.5, 0.0],
        },
        [FEB, FEB],
    )


def _store(config: RepoConfig, settings: Settings) -> FeatureStore:
    store = FeatureStore(repo_path=str(settings.feature_repo), config=config)
    views = build_views(settings)
    store.apply([user, *views, build_feature_service(views)])
    _write_cases(store)
    return store


@pytest.fixture(params=["sqlite", "redis"])
def store_and_settings(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[FeatureStore, Settings]]:
    settings = Settings(home=tmp_path)
    settings.feast_dir.mkdir(parents=True)
    config = embedded_repo_config(settings)
    if request.param == "redis":
        # Only the online store changes: the file registry keeps the test free of PostgreSQL.
        redis_url = request.getfixturevalue("redis_server")
        project = request.getfixturevalue("redis_project")
        config = RepoConfig(
            **{
                **config.model_dump(by_alias=True, exclude_unset=True),
                "project": project,
                "online_store": {"type": "redis", "connection_string": redis_connection_string(redis_url)},
            }
        )
    yield _store(config, settings), settings


def _generic_rows(
    provider: Provider, config: RepoConfig, views: Sequence[ViewFeatures], join_key: str
) -> OnlineRows:
    return ProviderRows(provider, config, views, join_key)


@pytest.fixture
def online_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The feature views Feast's provider `online_read` is asked for while the test runs."""
    views: list[str] = []
    original = PassthroughProvider.online_read

    def counted(
        self: PassthroughProvider,
        config: RepoConfig,
        table: FeatureView,
        entity_keys: list[EntityKeyProto],
        requested_features: list[str] | None = None,
    ) -> object:
        views.append(table.name)
        return original(self, config, table, entity_keys, requested_features)

    monkeypatch.setattr(PassthroughProvider, "online_read", counted)
    return views


@pytest.mark.parametrize("path", ["one round-trip", "per view"])
def test_bulk_read_equals_feast_sdk(
    store_and_settings: tuple[FeatureStore, Settings],
    path: str,
    online_reads: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, settings = store_and_settings
    if path == "per view":  # what any online store other than SQLite and Redis gets
        monkeypatch.setattr(streamflow.server.features, "online_rows", _generic_rows)
    reader = FeatureReader(store, FEATURE_SERVICE_NAME, settings)

    cells = reader.read_cells(REQUEST)

    views = [view.name for view in store.get_feature_service(FEATURE_SERVICE_NAME).feature_view_projections]
    assert online_reads == ([] if path == "one round-trip" else views)

    sdk = store.get_online_features(
        features=store.get_feature_service(FEATURE_SERVICE_NAME), entity_rows={JOIN_KEY: REQUEST}
    ).proto
    column = {name: i for i, name in enumerate(sdk.metadata.feature_names.val)}
    assert len(cells) == len(REQUEST)
    for row, user_cells in enumerate(cells):
        assert len(user_cells) == len(reader.schema)
        for feature, (value, event_time) in zip(reader.schema, user_cells, strict=True):
            vector = sdk.results[column[feature.name]]
            assert value == vector.values[row], (REQUEST[row], feature.name)
            assert event_time == vector.event_timestamps[row].ToDatetime(tzinfo=UTC), (
                REQUEST[row],
                feature.name,
            )
    # The cases really cover what they claim: a null inside a row, a view without a row, an unknown user.
    by_name = {f.name: i for i, f in enumerate(reader.schema)}
    with_nulls = cells[REQUEST.index("WITH-NULLS")]
    assert with_nulls[by_name["monthly_fee"]][0].WhichOneof("val") is None
    assert with_nulls[by_name["monthly_fee"]][1] == JAN_NOON
    part_only = cells[REQUEST.index("PART-ONLY")]
    assert part_only[by_name["support_tickets_90d"]][1] == datetime.fromtimestamp(0, UTC)
    assert all(value.WhichOneof("val") is None for value, _ in cells[REQUEST.index("9999-99999")])
    assert cells[0] == cells[-1]


def test_read_classifies_each_case_with_the_first_failing_check(
    store_and_settings: tuple[FeatureStore, Settings],
) -> None:
    store, settings = store_and_settings  # the clock: the demo's, 2024-03-07
    reader = FeatureReader(store, FEATURE_SERVICE_NAME, settings)

    stale, part_only, with_nulls, out_of_range, unknown, repeated = reader.read(REQUEST)

    assert isinstance(unknown, EntityNotFound)
    assert len(unknown.problems) == len(reader.schema)
    assert isinstance(part_only, FeaturesMissing)
    assert [p.feature for p in part_only.problems] == [f.name for f in reader.schema[6:]]
    assert isinstance(with_nulls, FeaturesMissing)  # its profile row is stale too: missing comes first
    assert with_nulls.message == (
        "user WITH-NULLS lacks 6 feature(s) in the online store: monthly_fee, paperless_billing, "
        "net_service, watch_hours_30d, support_tickets_90d, ticket_avg_resolution_hrs_90d; "
        "materialize the feature views that hold them"
    )
    assert with_nulls.problems[0].description == "no value in feature view subscription_profile_fv"
    assert isinstance(stale, FeaturesStale)  # its usage row is 35.5 days old, over the view's 35
    assert [p.feature for p in stale.problems] == [f.name for f in reader.schema[6:11]]
    assert stale.problems[0].description == (
        "event time 2024-01-31T12:30:00+00:00 is 35.5 days before 2024-03-07T00:00:00+00:00; "
        "feature view usage_agg_30d_fv trusts values for 35 days"
    )
    assert isinstance(out_of_range, FeaturesInvalid)
    assert [(p.feature, p.description) for p in out_of_range.problems] == [
        ("monthly_fee", "inf is not a finite number"),
        ("net_service", "'Cable' is not one of: DSL, Fiber optic, No"),
        ("watch_hours_30d", "1000.0 is outside the valid range [0, 720]"),
        ("skips_7d", "-1 is outside the valid range [0, inf]"),
    ]
    assert isinstance(repeated, FeaturesStale)
    assert repeated.message == stale.message

    fresh = settings.model_copy(update={"staleness_reference": FEB})
    (row,) = FeatureReader(store, FEATURE_SERVICE_NAME, fresh).read(["7590-VHVEG"])
    assert isinstance(row, FeatureRow)
    assert [(v.name, v.value, v.event_time) for v in row.values[:2]] == [
        ("months_active", 3, FEB),
        ("monthly_fee", 9.5, FEB),
    ]
    assert [v.name for v in row.values] == [f.name for f in reader.schema]
    live = settings.model_copy(update={"staleness_reference": "now"})
    (stale_and_invalid,) = FeatureReader(store, FEATURE_SERVICE_NAME, live).read(["OUT-OF-RANGE"])
    assert isinstance(stale_and_invalid, FeaturesStale)


def test_a_view_without_ttl_never_goes_stale(store_and_settings: tuple[FeatureStore, Settings]) -> None:
    store, settings = store_and_settings
    usage = store.get_feature_view("usage_agg_30d_fv")  # the one view 7590-VHVEG is stale in
    usage.ttl = timedelta(0)
    store.apply([usage])

    (result,) = FeatureReader(store, FEATURE_SERVICE_NAME, settings).read(["7590-VHVEG"])

    assert isinstance(result, FeatureRow)


def test_an_unreachable_store_is_unavailable(store_and_settings: tuple[FeatureStore, Settings]) -> None:
    store, settings = store_and_settings
    online = store.config.online_store
    # The registry stays readable; the online store is a folder (SQLite) or a port nobody listens on.
    broken = (
        {"path": str(settings.feast_dir)} if online.type == "sqlite" else {"connection_string": "127.0.0.1:1"}
    )
    config = RepoConfig(
        **{
            **store.config.model_dump(by_alias=True, exclude_unset=True),
            "online_store": {**online.model_dump(exclude_unset=True), "type": online.type, **broken},
        }
    )
    reader = FeatureReader(
        FeatureStore(repo_path=str(settings.feature_repo), config=config), FEATURE_SERVICE_NAME, settings
    )

    with pytest.raises(FeatureStoreUnavailable) as unavailable:
        reader.read_cells(["7590-VHVEG"])

    assert unavailable.value.metadata == {"onlineStore": online.type}


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.filterwarnings("ignore:Serialization of entity key with version < 3")
def test_entity_keys_are_feasts_bytes_without_calling_feast_per_user(
    tmp_path: Path, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = embedded_repo_config(Settings(home=tmp_path)).model_copy(
        update={"entity_key_serialization_version": version}
    )
    encode = entity_key_encoder(JOIN_KEY, config)

    def not_per_user(entity_key: EntityKeyProto, entity_key_serialization_version: int) -> bytes:
        raise AssertionError("the verified encoding calls Feast's function only at load")

    monkeypatch.setattr(streamflow.server.online_rows, "serialize_entity_key", not_per_user)
    for user_id in [*PROBE_IDS, "7590-VHVEG", "Ω-ünknown_名", "0" * 64]:
        assert encode(user_id) == _feast_key(user_id, version), user_id


def test_an_entity_key_layout_unlike_feasts_falls_back_to_feasts_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A Feast whose bytes for a key are no longer a prefix, the length and the UTF-8 bytes.
    def changed(entity_key: EntityKeyProto, entity_key_serialization_version: int) -> bytes:
        return serialize_entity_key(entity_key, entity_key_serialization_version)[::-1]

    monkeypatch.setattr(streamflow.server.online_rows, "serialize_entity_key", changed)
    with caplog.at_level(logging.WARNING, logger="streamflow.server.online_rows"):
        encode = entity_key_encoder(JOIN_KEY, embedded_repo_config(Settings(home=tmp_path)))

    assert encode("7590-VHVEG") == _feast_key("7590-VHVEG", 3)[::-1]
    assert "entity key serialization differs from Feast's" in caplog.text


def _feast_key(user_id: str, version: int) -> bytes:
    key = EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(string_val=user_id)])
    return bytes(serialize_entity_key(key, entity_key_serialization_version=version))
