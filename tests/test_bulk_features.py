"""The server's bulk feature read returns exactly what the Feast SDK's `get_online_features` returns.

Rows are written straight into the online store (SQLite, and Redis when it runs), so the cases are exact: a
user with every view, one with some views only, one with null values, an unknown user and a repeated user.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feast import FeatureStore, RepoConfig

from feature_repo.definitions import FEATURE_SERVICE_NAME, JOIN_KEY, build_feature_service, build_views, user
from feature_repo.production import redis_connection_string
from feature_repo.store import embedded_repo_config
from server.features import FeatureReader
from streamflow.settings import Settings

FEB = datetime(2024, 2, 29, tzinfo=UTC)
JAN_NOON = datetime(2024, 1, 31, 12, 30, tzinfo=UTC)
REQUEST = ["7590-VHVEG", "PART-ONLY", "WITH-NULLS", "9999-99999", "7590-VHVEG"]


def _write_cases(store: FeatureStore) -> None:
    views = {view.name: [f.name for f in view.features] for view in store.list_feature_views()}

    def write(view: str, rows: dict[str, list[object]], at: list[datetime]) -> None:
        frame = pd.DataFrame({JOIN_KEY: rows.pop(JOIN_KEY), "as_of": at, **rows})
        assert sorted(rows) == sorted(views[view])
        store.write_to_online_store(view, frame)

    write(
        "subscription_profile_fv",
        {
            JOIN_KEY: ["7590-VHVEG", "PART-ONLY", "WITH-NULLS"],
            "months_active": [3, 4, 5],
            "monthly_fee": [9.5, 12.25, np.nan],
            "paperless_billing": [True, False, None],
            "plan_stream_tv": [True, True, False],
            "plan_stream_movies": [False, True, False],
            "net_service": ["DSL", "Fiber optic", None],
        },
        [FEB, FEB, JAN_NOON],
    )
    write(
        "usage_agg_30d_fv",
        {
            JOIN_KEY: ["7590-VHVEG", "WITH-NULLS"],
            "watch_hours_30d": [1.5, np.nan],
            "avg_session_mins_7d": [2.0, 3.5],
            "unique_devices_30d": [1, 2],
            "skips_7d": [2, 0],
            "rebuffer_events_7d": [0, 1],
        },
        [JAN_NOON, FEB],
    )
    write(
        "payments_agg_90d_fv",
        {JOIN_KEY: ["7590-VHVEG", "WITH-NULLS"], "failed_payments_90d": [0, 1]},
        [FEB, FEB],
    )
    write(
        "support_agg_90d_fv",
        {JOIN_KEY: ["7590-VHVEG"], "support_tickets_90d": [2], "ticket_avg_resolution_hrs_90d": [4.5]},
        [FEB],
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


def test_bulk_read_equals_feast_sdk(store_and_settings: tuple[FeatureStore, Settings]) -> None:
    store, settings = store_and_settings
    reader = FeatureReader(store, FEATURE_SERVICE_NAME, settings)

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
