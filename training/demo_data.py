"""Deterministic demo data of StreamFlow: the monthly snapshot tables and churn labels.

Generating process (every draw comes from one ``numpy.random.Generator`` seeded with ``seed``, so the same
``(users, seed)`` always gives the same tables):

- ``users`` subscribers exist at the first snapshot (2024-01-31). Ids look like ``7590-VHVEG`` (4 digits, a
  dash, 5 capital letters); the first subscriber is ``7590-VHVEG``. Each subscriber has two hidden traits that
  persist across months: engagement ``e ~ N(0, 1)`` (how much they like the service) and money trouble
  ``m ~ N(0, 1)``.
- Subscription profile: ``months_active`` = 1 + Exponential(mean 22) months, capped at 72; ``net_service`` is
  Fiber optic (44%), DSL (34%) or No (22%); each streaming plan is taken with probability
  sigmoid(0.8 e - 0.2); ``monthly_fee`` = 20 / 45 / 70 (No / DSL / Fiber optic) + 10 per streaming plan
  + N(0, 4), at least 18.25; ``paperless_billing`` with probability 0.6.
- Usage: ``watch_hours_30d`` ~ Gamma(2, 12 exp(0.6 e)); ``avg_session_mins_7d`` ~ N(35 + 8 e, 8) (at least 1);
  ``unique_devices_30d`` = 1 + Poisson(1.2 exp(0.3 e)); ``skips_7d`` ~ Poisson(3 exp(-0.5 e));
  ``rebuffer_events_7d`` ~ Poisson(0.6 / 1.8 / 3.0) for Fiber optic / DSL / No.
- Payments and support: ``failed_payments_90d`` ~ Poisson(0.25 exp(0.9 m)); ``support_tickets_90d`` ~
  Poisson(0.3 + 0.2 rebuffer_events_7d); ``ticket_avg_resolution_hrs_90d`` ~ Gamma(2, 10) hours when there
  was a ticket, else 0.
- Churn (label ``churned`` of a snapshot = the subscriber cancels within the following month) is drawn with
  probability sigmoid(z), where z depends only on the features above, so a model can learn it::

      z = -0.3 - 0.07 months_active + 1.2 [Fiber optic] + 0.03 (monthly_fee - 65) - 0.05 watch_hours_30d
          + 0.12 skips_7d + 0.9 failed_payments_90d + 0.45 support_tickets_90d
          + 0.02 ticket_avg_resolution_hrs_90d - 0.5 paperless_billing

  (about one subscriber in four churns, as in the public telco data set these ids imitate).
- Between the two snapshots values drift: engagement moves (``e' = 0.85 e + 0.5 N(0, 1)``), one subscriber in
  three gets a 5% price rise, every rolling aggregate is drawn afresh for the new month and ``months_active``
  grows by one. About 3% of the January subscribers leave (their accounts are deleted, so they are absent from
  February; churners are the most likely to leave) and about 3% new subscribers join in February
  (``months_active`` = 1).

``generate_tables`` returns the tables as DataFrames (the production profile loads them into PostgreSQL);
``write_tables`` stores them as Parquet under ``settings.data_dir`` for the embedded profile.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamflow.feature_repo.definitions import LABELS_TABLE, SNAPSHOT_DATES, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.settings import Settings
from streamflow.training.fingerprint import frame_fingerprint

log = logging.getLogger(__name__)

FIRST_USER_ID = "7590-VHVEG"
# Bump when the generating process changes, so an old data folder is regenerated.
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
NET_SERVICES = np.array(["Fiber optic", "DSL", "No"], dtype=object)

_LEAVE_RATE_CHURNER = 0.11  # with ~26% churners this deletes ~3% of the January accounts
_JOIN_RATE = 0.03
_ID_SPACE = 10**4 * 26**5  # 4 digits, then 5 capital letters


def snapshot_timestamp(day: date) -> pd.Timestamp:
    """The `as_of` of a snapshot: 00:00 UTC of its date."""
    return pd.Timestamp(datetime(day.year, day.month, day.day, tzinfo=UTC))


def _id_code(user_id: str) -> int:
    """The integer an id like 7590-VHVEG encodes: its 4 digits, then its 5 letters in base 26."""
    code = int(user_id[:4])
    for letter in user_id[5:]:
        code = code * 26 + ord(letter) - ord("A")
    return code


def _user_ids(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` distinct ids shaped like 7590-VHVEG, the first one being exactly that id."""
    # Work on integer codes (fast to deduplicate at a million ids), spell them out once at the end.
    codes = np.array([_id_code(FIRST_USER_ID)], dtype=np.int64)
    while len(codes) < count:
        # Draw a few extra: collisions among 1.2e11 possible ids are rare, but an id must never repeat.
        missing = count - len(codes)
        merged = np.concatenate([codes, rng.integers(0, _ID_SPACE, size=missing + 16 + missing // 100)])
        _, first_seen = np.unique(merged, return_index=True)
        codes = merged[np.sort(first_seen)]
    codes = codes[:count]
    chars = np.empty((count, 10), dtype=np.uint8)
    chars[:, 4] = ord("-")
    for position in range(9, 4, -1):
        chars[:, position] = ord("A") + codes % 26
        codes = codes // 26
    for position in range(3, -1, -1):
        chars[:, position] = ord("0") + codes % 10
        codes = codes // 10
    return chars.view("S10").ravel().astype("U10").astype(object)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _month(
    rng: np.random.Generator,
    traits: pd.DataFrame,
    months_active: np.ndarray,
    fee_rise: np.ndarray,
) -> pd.DataFrame:
    """One snapshot's features and churn label for the subscribers in `traits` (index = user_id)."""
    n = len(traits)
    e = traits["engagement"].to_numpy()
    m = traits["money_trouble"].to_numpy()
    net = traits["net_service"].to_numpy()
    fiber = net == "Fiber optic"
    rebuffer_rate = np.select([fiber, net == "DSL"], [0.6, 1.8], default=3.0)

    fee = traits["base_fee"].to_numpy() * np.where(fee_rise, 1.05, 1.0)
    watch = rng.gamma(2.0, 12.0 * np.exp(0.6 * e))
    session = np.maximum(rng.normal(35.0 + 8.0 * e, 8.0), 1.0)
    devices = 1 + rng.poisson(1.2 * np.exp(0.3 * e))
    skips = rng.poisson(3.0 * np.exp(-0.5 * e))
    rebuffers = rng.poisson(rebuffer_rate)
    failed = rng.poisson(0.25 * np.exp(0.9 * m))
    tickets = rng.poisson(0.3 + 0.2 * rebuffers)
    resolution = np.where(tickets > 0, rng.gamma(2.0, 10.0, size=n), 0.0)
    paperless = traits["paperless_billing"].to_numpy()

    z = (
        -0.3
        - 0.07 * months_active
        + 1.2 * fiber
        + 0.03 * (fee - 65.0)
        - 0.05 * watch
        + 0.12 * skips
        + 0.9 * failed
        + 0.45 * tickets
        + 0.02 * resolution
        - 0.5 * paperless
    )
    churned = rng.random(n) < _sigmoid(z)
    return pd.DataFrame(
        {
            "user_id": traits.index.to_numpy(),
            "months_active": months_active.astype(np.int64),
            "monthly_fee": np.round(fee, 2),
            "paperless_billing": paperless,
            "plan_stream_tv": traits["plan_stream_tv"].to_numpy(),
            "plan_stream_movies": traits["plan_stream_movies"].to_numpy(),
            "net_service": net,
            "watch_hours_30d": np.round(watch, 1),
            "avg_session_mins_7d": np.round(session, 1),
            "unique_devices_30d": devices.astype(np.int64),
            "skips_7d": skips.astype(np.int64),
            "rebuffer_events_7d": rebuffers.astype(np.int64),
            "failed_payments_90d": failed.astype(np.int64),
            "support_tickets_90d": tickets.astype(np.int64),
            "ticket_avg_resolution_hrs_90d": np.round(resolution, 1),
            "churned": churned,
        }
    )


def _traits(rng: np.random.Generator, user_ids: np.ndarray) -> pd.DataFrame:
    """The persistent, partly hidden, traits of new subscribers."""
    n = len(user_ids)
    e = rng.normal(size=n)
    net = rng.choice(NET_SERVICES, size=n, p=[0.44, 0.34, 0.22])
    tv = rng.random(n) < _sigmoid(0.8 * e - 0.2)
    movies = rng.random(n) < _sigmoid(0.8 * e - 0.2)
    base = np.select([net == "Fiber optic", net == "DSL"], [70.0, 45.0], default=20.0)
    base = np.maximum(base + 10.0 * tv + 10.0 * movies + rng.normal(0.0, 4.0, size=n), 18.25)
    return pd.DataFrame(
        {
            "engagement": e,
            "money_trouble": rng.normal(size=n),
            "net_service": net,
            "plan_stream_tv": tv,
            "plan_stream_movies": movies,
            "base_fee": base,
            "paperless_billing": rng.random(n) < 0.6,
        },
        index=pd.Index(user_ids, name="user_id"),
    )


def _split_tables(month: pd.DataFrame, day: date) -> dict[str, pd.DataFrame]:
    """One month's wide frame cut into the snapshot tables of VIEW_SPECS plus the labels table."""
    month = month.assign(**{TIMESTAMP_FIELD: snapshot_timestamp(day)})
    keys = ["user_id", TIMESTAMP_FIELD]
    tables = {spec.table: month[keys + [name for name, _ in spec.features]] for spec in VIEW_SPECS}
    tables[LABELS_TABLE] = month[[*keys, "churned"]]
    return tables


def generate_tables(users: int, seed: int) -> dict[str, pd.DataFrame]:
    """Every demo table by name (the VIEW_SPECS snapshot tables and `churn_labels`), both months stacked."""
    if users < 1:
        raise ValueError("users must be at least 1")
    jan, feb = SNAPSHOT_DATES
    rng = np.random.default_rng(seed)
    joiners = max(1, round(users * _JOIN_RATE)) if users > 1 else 0
    ids = _user_ids(rng, users + joiners)

    traits = _traits(rng, ids[:users])
    tenure = np.minimum(1 + np.floor(rng.exponential(22.0, size=users)), 72)
    january = _month(rng, traits, tenure, fee_rise=np.zeros(users, dtype=bool))

    # Leavers: deleted accounts, mostly among January's churners; the first user stays for the demos.
    leaves = january["churned"].to_numpy() & (rng.random(users) < _LEAVE_RATE_CHURNER)
    leaves[0] = False
    stayers = traits[~leaves].copy()
    stayers["engagement"] = 0.85 * stayers["engagement"] + 0.5 * rng.normal(size=len(stayers))
    newcomers = _traits(rng, ids[users:])
    february_traits = pd.concat([stayers, newcomers])
    february_tenure = np.concatenate([np.minimum(tenure[~leaves] + 1, 72), np.ones(joiners)])
    fee_rise = np.concatenate([rng.random(len(stayers)) < 1 / 3, np.zeros(joiners, dtype=bool)])
    february = _month(rng, february_traits, february_tenure, fee_rise)

    by_month = [_split_tables(january, jan), _split_tables(february, feb)]
    return {name: pd.concat([month[name] for month in by_month], ignore_index=True) for name in by_month[0]}


def tables_fingerprint(tables: dict[str, pd.DataFrame]) -> str:
    """One fingerprint for a set of tables: their content in generated row order, not their file bytes."""
    parts = sorted(f"{name}:{frame_fingerprint(frame)}" for name, frame in tables.items())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def table_path(settings: Settings, table: str) -> Path:
    """Parquet file of one demo table in the embedded profile."""
    return settings.data_dir / f"{table}.parquet"


def write_tables(settings: Settings, tables: dict[str, pd.DataFrame], users: int, seed: int) -> str:
    """Write the tables as Parquet under settings.data_dir with a manifest; returns the data fingerprint."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_parquet(table_path(settings, name), index=False)
    fingerprint = tables_fingerprint(tables)
    manifest = {"users": users, "seed": seed, "generator": GENERATOR_VERSION, "fingerprint": fingerprint}
    # Written last: a manifest means every table of it is complete.
    (settings.data_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return fingerprint


def written_manifest(settings: Settings) -> dict[str, Any] | None:
    """The manifest of the complete set of Parquet tables in settings.data_dir, or None if there is none."""
    try:
        manifest: dict[str, Any] = json.loads((settings.data_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    tables = [spec.table for spec in VIEW_SPECS] + [LABELS_TABLE]
    if manifest.get("generator") != GENERATOR_VERSION or not all(
        table_path(settings, table).is_file() for table in tables
    ):
        return None
    return manifest
