"""The feature reader on the bootstrapped store: the staleness threshold from both sides, and its clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from feature_repo.definitions import FEATURE_SERVICE_NAME, VIEW_SPECS
from feature_repo.store import open_store
from server.errors import FeaturesStale
from server.features import FeatureReader, FeatureRow, FeatureServiceError
from streamflow.settings import Settings
from tests.fixtures.serving import departed_users
from training.demo_data import FIRST_USER_ID

LEAVER_SNAPSHOT = datetime(2024, 1, 31, tzinfo=UTC)
AGGREGATE_TTL = VIEW_SPECS[1].ttl
AGGREGATE_FEATURES = [name for spec in VIEW_SPECS[1:] for name, _ in spec.features]


def read(settings: Settings, user_id: str, reference: datetime | str) -> FeatureRow | Exception:
    clocked = settings.model_copy(update={"staleness_reference": reference})
    (result,) = FeatureReader(open_store(clocked), FEATURE_SERVICE_NAME, clocked).read([user_id])
    return result


def test_a_feature_exactly_ttl_old_is_fresh_and_a_second_older_is_stale(embedded_settings: Settings) -> None:
    leaver = departed_users(embedded_settings)[0]
    at_ttl = LEAVER_SNAPSHOT + AGGREGATE_TTL

    fresh = read(embedded_settings, leaver, at_ttl)
    stale = read(embedded_settings, leaver, at_ttl + timedelta(seconds=1))

    assert isinstance(fresh, FeatureRow)
    assert isinstance(stale, FeaturesStale)
    assert [p.feature for p in stale.problems] == AGGREGATE_FEATURES


def test_a_live_clock_finds_the_2024_demo_data_stale(embedded_settings: Settings) -> None:
    result = read(embedded_settings, FIRST_USER_ID, "now")

    assert isinstance(result, FeaturesStale)
    # Every view is past its TTL, the 90-day profile included.
    assert len(result.problems) == sum(len(spec.features) for spec in VIEW_SPECS)


def test_an_event_time_after_the_clock_is_not_stale(embedded_settings: Settings) -> None:
    result = read(embedded_settings, FIRST_USER_ID, datetime(2024, 1, 1, tzinfo=UTC))

    assert isinstance(result, FeatureRow)


def test_an_unknown_feature_service_is_refused(embedded_settings: Settings) -> None:
    with pytest.raises(FeatureServiceError) as refused:
        FeatureReader(open_store(embedded_settings), "churn_model_v9", embedded_settings)

    assert "churn_model_v9" in str(refused.value)
