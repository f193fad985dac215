"""The server's bulk feature read returns exactly what the Feast SDK's `get_online_features` returns.

Rows are written straight into the online store (SQLite, and Redis when it runs), so the cases are exact: a
user with every view, one with some views only, one with null values, one with invalid values, an unknown user
and a repeated user, in each store the server reads (SQLite and Redis) through the layout the control plane
resolves with Feast, by the reader a worker runs without Feast.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feast import FeatureStore, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

import streamflow.server.feature_layout
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
from streamflow.server.feature_layout import PROBE_IDS, FeatureServiceError, feature_layout, store_layout
from streamflow.server.features import FeatureReader, FeatureRow
from streamflow.server.online_rows import entity_key_encoder
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


def _reader(store: FeatureStore, settings: Settings) -> FeatureReader:
    return FeatureReader(feature_layout(store, FEATURE_SERVICE_NAME), settings)


def test_bulk_read_equals_feast_sdk(store_and_settings: tuple[FeatureStore, Settings]) -> None:
    store, settings = store_and_settings
    reader = _reader(store, settings)

    cells = reader.read_cells(REQUEST)

    sdk = store.get_online_features(
        features=store.get_feature_service(FEATURE_SERVICE_NAME), entity_rows={JOIN_KEY: REQUEST}
    ).proto
    column = {name: i for i, name in enumerate(sdk.metadata.feature_names.val)}
    assert len(cells) == len(REQUEST)
    for row, user_cells in enumerate(cells):
        assert len(user_cells) == len(reader.schema)
        for feature, (value, event_time) in zip(reader.schema, user_cells, strict=True):
            vector = sdk.results[column[feature.name]]
            # Two classes of one message (the reader's descriptor pool is its own): equal bytes, equal value.
            assert value.SerializeToString() == vector.values[row].SerializeToString(), (
                REQUEST[row],
                feature.name,
            )
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
    reader = _reader(store, settings)

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
    (row,) = _reader(store, fresh).read(["7590-VHVEG"])
    assert isinstance(row, FeatureRow)
    assert [(v.name, v.value, v.event_time) for v in row.values[:2]] == [
        ("months_active", 3, FEB),
        ("monthly_fee", 9.5, FEB),
    ]
    assert [v.name for v in row.values] == [f.name for f in reader.schema]
    live = settings.model_copy(update={"staleness_reference": "now"})
    (stale_and_invalid,) = _reader(store, live).read(["OUT-OF-RANGE"])
    assert isinstance(stale_and_invalid, FeaturesStale)


def test_a_view_without_ttl_never_goes_stale(store_and_settings: tuple[FeatureStore, Settings]) -> None:
    store, settings = store_and_settings
    usage = store.get_feature_view("usage_agg_30d_fv")  # the one view 7590-VHVEG is stale in
    usage.ttl = timedelta(0)
    store.apply([usage])

    (result,) = _reader(store, settings).read(["7590-VHVEG"])

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
    reader = _reader(FeatureStore(repo_path=str(settings.feature_repo), config=config), settings)

    with pytest.raises(FeatureStoreUnavailable) as unavailable:
        reader.read_cells(["7590-VHVEG"])

    assert unavailable.value.metadata == {"onlineStore": online.type}


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.filterwarnings("ignore:Serialization of entity key with version < 3")
def test_entity_keys_are_feasts_bytes(tmp_path: Path, version: int) -> None:
    config = embedded_repo_config(Settings(home=tmp_path)).model_copy(
        update={"entity_key_serialization_version": version}
    )
    encode = entity_key_encoder(store_layout(config).entity_key_prefix)

    for user_id in [*PROBE_IDS, "7590-VHVEG", "Ω-ünknown_名", "0" * 64]:
        assert encode(user_id) == _feast_key(user_id, version), user_id


def test_an_entity_key_layout_unlike_feasts_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Feast whose bytes for a key are no longer a prefix, the length and the UTF-8 bytes.
    def changed(entity_key: EntityKeyProto, entity_key_serialization_version: int) -> bytes:
        return serialize_entity_key(entity_key, entity_key_serialization_version)[::-1]

    monkeypatch.setattr(streamflow.server.feature_layout, "serialize_entity_key", changed)
    with pytest.raises(FeatureServiceError) as refused:
        store_layout(embedded_repo_config(Settings(home=tmp_path)))

    assert (
        str(refused.value)
        == "Feast's entity key serialization (version 3) is not the layout the server reads"
    )


def _feast_key(user_id: str, version: int) -> bytes:
    key = EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(string_val=user_id)])
    return bytes(serialize_entity_key(key, entity_key_serialization_version=version))


def test_an_online_store_the_server_does_not_read_is_refused_with_a_reason(tmp_path: Path) -> None:
    config = embedded_repo_config(Settings(home=tmp_path))
    sentinel = RepoConfig(
        **{
            **config.model_dump(by_alias=True, exclude_unset=True),
            "online_store": {
                "type": "redis",
                "redis_type": "redis_sentinel",
                "sentinel_master": "mymaster",
                "connection_string": "127.0.0.1:26379",
            },
        }
    )

    with pytest.raises(FeatureServiceError) as refused:
        store_layout(sentinel)

    assert str(refused.value) == "Redis type RedisType.redis_sentinel is not one the server reads"
