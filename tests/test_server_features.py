"""The feature reader on the bootstrapped store: the staleness threshold from both sides, and its clock; and
its validity rule against the published ranges and categories."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from streamflow.feature_repo.definitions import FEATURE_SERVICE_NAME, VIEW_SPECS
from streamflow.feature_repo.store import open_store
from streamflow.server.domain import FeatureScalar, FeatureSchema, FeatureType
from streamflow.server.errors import FeaturesStale
from streamflow.server.feature_layout import FeatureServiceError, feature_layout
from streamflow.server.features import FeatureReader, FeatureRow, _value_rule
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.serving import departed_users

LEAVER_SNAPSHOT = datetime(2024, 1, 31, tzinfo=UTC)
AGGREGATE_TTL = VIEW_SPECS[1].ttl
AGGREGATE_FEATURES = [name for spec in VIEW_SPECS[1:] for name, _ in spec.features]


def read(settings: Settings, user_id: str, reference: datetime | str) -> FeatureRow | Exception:
    clocked = settings.model_copy(update={"staleness_reference": reference})
    reader = FeatureReader(feature_layout(open_store(clocked), FEATURE_SERVICE_NAME), clocked)
    (result,) = reader.read([user_id])
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
        feature_layout(open_store(embedded_settings), "churn_model_v9")

    assert "churn_model_v9" in str(refused.value)


# The valid values of each served feature, written from the domain, not from the code: counts and
# durations are never negative, a 30-day window holds at most 720 hours, a 7-day window 10,080 minutes, a
# 90-day window 2,160 hours, and the net service is one of the three the product sells. (low, high) is
# inclusive; a set lists the accepted strings; None accepts any value of the type.
EXPECTED: dict[str, tuple[float, float] | set[str] | None] = {
    "months_active": (0, math.inf),
    "monthly_fee": (0, math.inf),
    "paperless_billing": None,
    "plan_stream_tv": None,
    "plan_stream_movies": None,
    "net_service": {"DSL", "Fiber optic", "No"},
    "watch_hours_30d": (0, 720),
    "avg_session_mins_7d": (0, 10_080),
    "unique_devices_30d": (0, math.inf),
    "skips_7d": (0, math.inf),
    "rebuffer_events_7d": (0, math.inf),
    "failed_payments_90d": (0, math.inf),
    "support_tickets_90d": (0, math.inf),
    "ticket_avg_resolution_hrs_90d": (0, 2_160),
}


def _cases(feature: FeatureSchema) -> list[tuple[FeatureScalar, bool]]:
    """(value, valid) pairs at and around the edges of the feature's expected values."""
    expected = EXPECTED[feature.name]
    if feature.type is FeatureType.BOOL:
        return [(True, True), (False, True)]
    if feature.type is FeatureType.STRING:
        accepted = expected if isinstance(expected, set) else set()
        strings = [(v, True) for v in sorted(accepted)] + [(v, False) for v in ("", "dsl", "Cable", "No ")]
        return list[tuple[FeatureScalar, bool]](strings)
    assert isinstance(expected, tuple), feature
    low, high = expected
    step = 1 if feature.type is FeatureType.INT64 else 0.5
    cases: list[tuple[FeatureScalar, bool]] = [(low - step, False), (low, True), (low + step, True)]
    cases += [(high, True), (high + step, False)] if math.isfinite(high) else [(10**9, True)]
    if feature.type is FeatureType.DOUBLE:
        cases += [(math.nan, False), (math.inf, False), (-math.inf, False)]
    return cases


def test_a_value_is_valid_exactly_within_the_published_ranges_and_categories(
    embedded_settings: Settings,
) -> None:
    # The real schema the server reads (names, types, views), so every served feature is covered.
    layout = feature_layout(open_store(embedded_settings), FEATURE_SERVICE_NAME)
    assert sorted(f.name for f in layout.schema) == sorted(EXPECTED)

    wrong = []
    for feature, rule in zip(layout.schema, layout.rules, strict=True):
        problem_of = _value_rule(feature, rule)
        for value, valid in _cases(feature):
            problem = problem_of(value)
            if (problem is None) != valid:
                wrong.append((feature.name, value, "refused" if problem else "accepted"))
            elif problem is not None:
                assert (problem.feature, problem.feature_view) == (feature.name, feature.feature_view)
    assert wrong == []
