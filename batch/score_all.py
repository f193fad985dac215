"""`streamflow score-all`: every user of a snapshot scored by the Production version, in one job.

The job takes what the server takes, so a user's batch score is its online score for the same features:

- the model: the server's own `build_artifact` (the same registry resolution of `STREAMFLOW_MODEL_URI`, the
  same checks, the ONNX export or the pickled pipeline) and `runtime_model`, built once per scoring process;
- the validity rules: the artifact's, through the server's own rule functions (`server.features`), checked
  in the server's order: no feature at all (ENTITY_NOT_FOUND), some missing (FEATURES_MISSING), some older
  than their view's TTL (FEATURES_STALE), a value out of range, not finite or not an allowed category
  (FEATURES_INVALID);
- the label: `model_contract.is_churn`'s threshold.

The features are the snapshot's, point in time, through Feast's `get_historical_features` at `as_of` 00:00
UTC for every user of the snapshot. Feast's join has no row for a view whose latest row is older than the
view's TTL (and the file offline store drops that user altogether), where the online store keeps that row
and the server calls it stale: so the latest row up to `as_of` of each view Feast left null is read back
from the offline data, and the user is judged as the server judges it with the clock at `as_of` (stale, or
missing when such a row has nulls).

Scoring runs in batches: in this process (`STREAMFLOW_COMPUTE=local`), or on Ray Data (`ray`), one actor per
CPU of the Ray cluster each holding the model, the rows in their original order. The driver receives the
scored batches, reports progress and writes them:

- embedded: one Parquet file, `<home>/scores/as_of=<date>/model_version=<n>.parquet`, written beside its
  final name and renamed over it once complete, so a reader sees the old file or the new one, never a part;
- production: the PostgreSQL table `churn_scores`, whose rows of (as_of, version) are deleted and written
  again in one transaction: a failed run leaves the table as it was.

Either way a re-run replaces the same rows with the same values (idempotent per as_of and version).
Refused users are written too, with their reason and no probability, so the output names every user.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from streamflow.errors import StreamflowError
from streamflow.feature_repo.compute import Compute, ray_session
from streamflow.feature_repo.definitions import FEATURE_SERVICE_NAME, JOIN_KEY, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.model_contract import CHURN_CLASS, is_churn
from streamflow.server.errors import (
    EntityNotFound,
    FeaturesInvalid,
    FeaturesMissing,
    FeaturesStale,
    row_of,
)
from streamflow.server.features import _FRAME_DTYPES, _value_rule
from streamflow.server.scoring_artifact import ScoringArtifact
from streamflow.settings import Profile, Settings

log = logging.getLogger(__name__)

BATCH_USERS = 20_000
"""Users per scoring batch: large enough that a batch's fixed cost (one ONNX call) is small beside it."""
SCORES_TABLE = "churn_scores"
"""The production profile's PostgreSQL table of scores."""
CHURN, STAY = "churn", "stay"
SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("as_of", pa.date32()),
        ("model_version", pa.string()),
        ("churn_probability", pa.float64()),
        ("label", pa.string()),
        ("refusal", pa.string()),
    ]
)
"""The output: one row per user of the snapshot; a refused user has a `refusal` reason (an ErrorInfo reason
of the server's) and no probability or label."""


def _reason(error: type[Exception]) -> str:
    row = row_of(error)  # type: ignore[arg-type]
    assert row is not None
    return row[1]


ENTITY_NOT_FOUND = _reason(EntityNotFound)
FEATURES_MISSING = _reason(FeaturesMissing)
FEATURES_STALE = _reason(FeaturesStale)
FEATURES_INVALID = _reason(FeaturesInvalid)
STALE_REFUSAL = "stale_refusal"
"""The column of `snapshot_features` that holds the reason of a user with a view older than its TTL."""


@dataclass
class Summary:
    """What a score-all run did."""

    as_of: date
    model_version: str
    users: int = 0
    scored: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    top_decile_threshold: float | None = None
    """The churn probability at the 90th percentile of the scored users: those above it are the top tenth."""
    output: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of.isoformat(),
            "model_version": self.model_version,
            "users": self.users,
            "scored": self.scored,
            "refused": dict(sorted(self.refused.items())),
            "top_decile_threshold": self.top_decile_threshold,
            "output": self.output,
            "seconds": round(self.seconds, 3),
        }


class Scorer:
    """Scores batches of feature rows with one artifact's model and rules; built once per scoring process
    (a Ray Data actor, or the driver itself)."""

    def __init__(self, artifact: ScoringArtifact, as_of: date) -> None:
        # Imported here: a Ray actor builds the model where it runs.
        from streamflow.server.loaded_model import runtime_model

        self._model = runtime_model(artifact)
        self._schema = artifact.layout.schema
        self._rules = [
            _value_rule(f, rule) for f, rule in zip(self._schema, artifact.layout.rules, strict=True)
        ]
        self._version = artifact.ref.version
        self._as_of = as_of

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """`batch`: rows of `snapshot_features`; returns rows of `SCHEMA`."""
        names = [f.name for f in self._schema]
        null = batch[names].isna().to_numpy()
        refusal = np.full(len(batch), None, dtype=object)
        refusal[null.any(axis=1)] = FEATURES_MISSING
        refusal[null.all(axis=1)] = ENTITY_NOT_FOUND
        judged = batch[STALE_REFUSAL].notna().to_numpy()
        refusal[judged] = batch[STALE_REFUSAL].to_numpy()[judged]
        invalid = np.zeros(len(batch), dtype=bool)
        for index, (name, problem_of) in enumerate(zip(names, self._rules, strict=True)):
            present = ~null[:, index]
            column = batch[name].to_numpy()[present]
            # Each distinct value is judged once by the server's own rule.
            bad = [value for value in pd.unique(column) if problem_of(value) is not None]
            if bad:
                invalid[np.flatnonzero(present)[pd.Series(column).isin(bad).to_numpy()]] = True
        refusal[invalid & (refusal == None)] = FEATURES_INVALID  # noqa: E711 (elementwise on objects)
        scored = refusal == None  # noqa: E711
        probability = np.full(len(batch), np.nan)
        if scored.any():
            rows = batch.loc[scored, names]
            columns = {f.name: rows[f.name].to_numpy(dtype=_FRAME_DTYPES[f.type]) for f in self._schema}
            probability[scored] = np.asarray(self._model.predict_proba(columns))[:, CHURN_CLASS]
        label = np.full(len(batch), None, dtype=object)
        label[scored] = [CHURN if is_churn(p) else STAY for p in probability[scored]]
        return pd.DataFrame(
            {
                "user_id": batch[JOIN_KEY].to_numpy(),
                "as_of": np.full(len(batch), self._as_of, dtype=object),
                "model_version": np.full(len(batch), self._version, dtype=object),
                "churn_probability": probability,
                "label": label,
                "refusal": refusal,
            }
        )


def production_artifact(settings: Settings) -> ScoringArtifact:
    """The scoring artifact of the version `STREAMFLOW_MODEL_URI` names (Production by default), built and
    checked as the server builds it."""
    from mlflow.tracking import MlflowClient

    from streamflow.feature_repo.store import opened_store
    from streamflow.server.model_loader import ModelTarget, build_artifact

    target = ModelTarget.parse(settings.model_uri)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    version = target.resolve(client)
    if version is None:
        raise StreamflowError(f"{settings.model_uri} names no model version; train and promote one first.")
    with opened_store(settings) as store:
        artifact = build_artifact(settings, client, store, version)
    if isinstance(artifact.model, Path):
        artifact = ScoringArtifact(**{**vars(artifact), "model": artifact.model_bytes()})
    return artifact


def snapshot_population(settings: Settings, as_of: date) -> pd.DataFrame:
    """The `user_id`s of the `as_of` snapshot (every user has a subscription profile), each once."""
    from streamflow.training.dataset import POPULATION_TABLE, _read_rows, snapshot_dates

    population = _read_rows(settings, POPULATION_TABLE, [JOIN_KEY], as_of)
    if population.empty:
        known = ", ".join(str(day) for day in snapshot_dates(settings)) or "none"
        raise StreamflowError(f"There is no snapshot dated {as_of}; the snapshots are dated: {known}.")
    return population.drop_duplicates(JOIN_KEY)


def snapshot_features(
    settings: Settings, as_of: date, population: pd.DataFrame, compute: Compute
) -> pd.DataFrame:
    """`user_id`, the FeatureService's features of each user of `population` as Feast's point-in-time join
    gives them at `as_of` 00:00 UTC, and `STALE_REFUSAL` (see the module), ordered by user_id."""
    from streamflow.feature_repo.store import opened_store
    from streamflow.training.demo_data import snapshot_timestamp

    entities = population.assign(event_timestamp=snapshot_timestamp(as_of))
    started = time.monotonic()
    with opened_store(settings, compute) as store:
        frame = store.get_historical_features(
            entity_df=entities, features=store.get_feature_service(FEATURE_SERVICE_NAME)
        ).to_df()
    seconds = time.monotonic() - started
    log.info("features of %d users at %s read in %.1f s (%s)", len(frame), as_of, seconds, compute)
    frame = frame.drop(columns=["event_timestamp", TIMESTAMP_FIELD], errors="ignore")
    # Every user of the population, though Feast's join drops a user whose only rows of some view are older
    # than its TTL: such a user comes back with nulls, judged below.
    frame = population[[JOIN_KEY]].merge(frame, on=JOIN_KEY, how="left", validate="one_to_one")
    frame = frame.sort_values(JOIN_KEY, kind="mergesort").reset_index(drop=True)
    return with_stale_refusals(settings, as_of, frame)


def with_stale_refusals(settings: Settings, as_of: date, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with `STALE_REFUSAL` added: for a user with a view whose latest row up to `as_of` is older
    than the view's TTL (Feast's join left it null), the server's reason with each view Feast left null in
    its latest row's place (FEATURES_STALE, or FEATURES_MISSING when such a row has nulls); None for every
    other user."""
    from streamflow.training.dataset import _read_rows
    from streamflow.training.demo_data import snapshot_timestamp

    features = [name for name in frame.columns if name != JOIN_KEY]
    null = frame[features].isna().to_numpy()
    stale = np.zeros(len(frame), dtype=bool)
    clock = snapshot_timestamp(as_of)
    for spec in VIEW_SPECS:
        names = [name for name, _ in spec.features if name in features]
        if not names:
            continue  # a view the FeatureService does not take
        absent = frame[names].isna().all(axis=1).to_numpy()
        if not absent.any():
            continue
        latest = (
            _read_rows(
                settings,
                spec.table,
                [JOIN_KEY, TIMESTAMP_FIELD, *names],
                None,
                users=frame[JOIN_KEY].to_numpy()[absent].tolist(),
                until=as_of,
            )
            .sort_values(TIMESTAMP_FIELD, kind="mergesort")
            .drop_duplicates(JOIN_KEY, keep="last")
            .set_index(JOIN_KEY)
        )
        rows = np.flatnonzero(absent & frame[JOIN_KEY].isin(latest.index).to_numpy())
        latest = latest.loc[frame[JOIN_KEY].to_numpy()[rows]]
        columns = np.array([features.index(name) for name in names])
        null[np.ix_(rows, columns)] = latest[names].isna().to_numpy()
        stale[rows] |= (pd.to_datetime(latest[TIMESTAMP_FIELD], utc=True) < clock - spec.ttl).to_numpy()
    refusal = np.full(len(frame), None, dtype=object)
    refusal[stale] = FEATURES_STALE
    refusal[stale & null.any(axis=1)] = FEATURES_MISSING
    refusal[stale & null.all(axis=1)] = ENTITY_NOT_FOUND
    if stale.any():
        log.info("%d users have a view older than its TTL at %s", stale.sum(), as_of)
    return frame.assign(**{STALE_REFUSAL: refusal})


def scored_batches(
    frame: pd.DataFrame, artifact: ScoringArtifact, as_of: date, compute: Compute, batch_users: int
) -> Iterator[pd.DataFrame]:
    """The scored rows of `frame`, batch after batch, in its order: here, or on Ray Data's actors."""
    if compute is Compute.LOCAL:
        scorer = Scorer(artifact, as_of)
        for start in range(0, len(frame), batch_users):
            yield scorer(frame.iloc[start : start + batch_users])
        return
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the output keeps user_id order: re-runs are identical
    context.enable_progress_bars = False  # the driver logs its own progress
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, math.ceil(len(frame) / batch_users))
    dataset = ray.data.from_pandas(frame, override_num_blocks=min(blocks, 10 * cpus))
    scored = dataset.map_batches(
        Scorer,
        fn_constructor_kwargs={"artifact": artifact, "as_of": as_of},
        batch_size=batch_users,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus),
        num_cpus=1,
    )
    yield from scored.iter_batches(batch_size=None, batch_format="pandas")


def score_all(
    settings: Settings,
    as_of: date,
    *,
    compute: Compute | None = None,
    batch_users: int = BATCH_USERS,
    output_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Score every user of the `as_of` snapshot with the served version and write the scores; see the module.

    `progress(done, total)` is called after each batch the driver receives (besides the log line)."""
    compute = Compute(settings.compute) if compute is None else compute
    started = time.monotonic()
    population = snapshot_population(settings, as_of)
    with ray_session(compute):
        artifact = production_artifact(settings)
        version = artifact.ref.version
        log.info(
            "scoring the %s snapshot with %s version %s (%s)", as_of, artifact.ref.name, version, compute
        )
        frame = snapshot_features(settings, as_of, population, compute)
        summary = Summary(as_of=as_of, model_version=version, users=len(frame))
        probabilities: list[np.ndarray] = []

        def tally(batches: Iterator[pd.DataFrame]) -> Iterator[pa.Table]:
            done = 0
            for batch in batches:
                done += len(batch)
                refusal = batch["refusal"]
                summary.refused.update(refusal.dropna().tolist())
                probabilities.append(batch["churn_probability"].to_numpy()[refusal.isna().to_numpy()])
                log.info("scored %d/%d users", done, len(frame))
                if progress is not None:
                    progress(done, len(frame))
                # A table, not a record batch: Ray Data's frames may hold Arrow columns of several chunks.
                yield pa.Table.from_pandas(batch, schema=SCHEMA, preserve_index=False)
            if done != len(frame):
                raise StreamflowError(
                    f"the scoring returned {done} rows for {len(frame)} users; nothing written"
                )

        parts = tally(scored_batches(frame, artifact, as_of, compute, batch_users))
        if settings.profile is Profile.PRODUCTION:
            summary.output = write_postgres(settings, parts, as_of, version)
        else:
            summary.output = str(write_parquet(output_dir or settings.home / "scores", parts, as_of, version))
    scored = np.concatenate(probabilities) if probabilities else np.empty(0)
    summary.scored = len(scored)
    summary.top_decile_threshold = float(np.quantile(scored, 0.9)) if len(scored) else None
    summary.seconds = time.monotonic() - started
    return summary


def scores_path(output_dir: Path, as_of: date, version: str) -> Path:
    """Where the embedded profile's scores of (as_of, version) live."""
    return output_dir / f"as_of={as_of.isoformat()}" / f"model_version={version}.parquet"


def write_parquet(output_dir: Path, parts: Iterator[pa.Table], as_of: date, version: str) -> Path:
    """Write every part to a temporary file beside the final one, then rename it over the final one."""
    path = scores_path(output_dir, as_of, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(descriptor)
    try:
        with pq.ParquetWriter(temporary, SCHEMA) as writer:
            for part in parts:
                writer.write_table(part)
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def write_postgres(settings: Settings, parts: Iterator[pa.Table], as_of: date, version: str) -> str:
    """Replace the rows of (as_of, version) in `churn_scores` by the parts, in one transaction."""
    from psycopg import sql

    from streamflow import postgres

    table = sql.Identifier(SCORES_TABLE)
    with postgres.connect(settings.postgres_dsn, application_name="streamflow-score-all") as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (user_id text NOT NULL, as_of date NOT NULL, "
                "model_version text NOT NULL, churn_probability double precision, label text, refusal text, "
                "PRIMARY KEY (as_of, model_version, user_id))"
            ).format(table)
        )
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE as_of = %s AND model_version = %s").format(table), (as_of, version)
        )
        columns = sql.SQL(", ").join(map(sql.Identifier, SCHEMA.names))
        with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, columns)) as copy:
            for part in parts:
                for row in zip(*(column.to_pylist() for column in part.columns), strict=True):
                    copy.write_row(row)
        # Leaving the block commits; an exception anywhere above rolls the whole run back.
    return f"PostgreSQL table {SCORES_TABLE} ({postgres.describe(settings.postgres_dsn)})"
