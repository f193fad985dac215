"""The feature reader on the bootstrapped store: the staleness threshold from both sides, and its clock; and
its validity rule against the published ranges and categories."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from feature_repo.definitions import FEATURE_SERVICE_NAME, VIEW_SPECS
from feature_repo.store import open_store
from server.domain import FeatureScalar, FeatureSchema, FeatureType
from server.errors import FeaturesStale
from server.features import (
    VALID_CATEGORIES,
    VALID_RANGES,
    FeatureReader,
    FeatureRow,
    FeatureServiceError,
    _value_rule,
)
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


SAMPLES: dict[FeatureType, list[FeatureScalar]] = {
    FeatureType.INT64: [-1, 0, 3, 720, 721, 10**7],
    FeatureType.DOUBLE: [-0.5, 0.0, 2.5, 720.0, 720.5, math.inf, -math.inf, math.nan],
    FeatureType.BOOL: [True, False],
    FeatureType.STRING: ["DSL", "Fiber optic", "No", "Cable", ""],
}


def test_a_value_is_valid_exactly_within_the_published_ranges_and_categories() -> None:
    for name in [*VALID_RANGES, *VALID_CATEGORIES, "unlisted"]:
        low, high = VALID_RANGES.get(name, (-math.inf, math.inf))
        for feature_type, values in SAMPLES.items():
            feature = FeatureSchema(name, feature_type, "some_fv")
            problem_of = _value_rule(feature)
            for value in values:
                numeric = feature_type in (FeatureType.INT64, FeatureType.DOUBLE)
                valid = (
                    (feature_type is not FeatureType.DOUBLE or math.isfinite(value))  # type: ignore[arg-type]
                    and (not numeric or low <= value <= high)  # type: ignore[operator]
                    and (name not in VALID_CATEGORIES or value in VALID_CATEGORIES[name])
                )
                problem = problem_of(value)
                assert (problem is None) == valid, (feature, value)
                if problem is not None:
                    assert (problem.feature, problem.feature_view) == (name, "some_fv")
