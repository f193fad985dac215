"""Shadow scoring: a candidate model scores a sample of the live users beside the model that answers.

With `STREAMFLOW_SHADOW_MODEL_URI` set, the control plane follows that URI like the served one and sends each
worker the shadow's scoring artifact (server/control_plane.py, server/model_follower.py); a single-process
server follows it with a second watcher. The shadow never answers. After a scoring call has built its
answers, `ShadowScorer.offer` hands the users it read (their features, the served probabilities) to a
bounded queue, and a background thread scores them with the shadow on the same features. A full queue drops
them and counts it: nothing about a call's answer, latency or errors depends on the shadow. With the
prediction log on, each queued user's log record waits for the shadow's result and goes with it
(`AwaitingShadow`, server/prediction_log.py).

What is learnt, per (shadow version, answering version): users compared, label agreement, mean |Δp| and a
fixed histogram of |Δp| (enough for its 99th percentile, and it adds up across workers). Each process keeps
its own tallies and writes them, cumulative, into a folder the control plane gives it (one file per
process, kept after it dies, like prometheus' multiprocess files), so any process sums the server's totals:
a worker for ModelInfo, the supervisor for the periodic summary in the log and the evidence it records in the
registry (server/shadow_evidence.py). The same counts are metrics (`streamflow_shadow_*`), which prometheus'
multiprocess mode adds up over the workers.

The scoring thread is supervised (server/supervised.py): one that ends unexpectedly is logged once and
replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter, Histogram

from streamflow.model_contract import CHURN_CLASS, CHURN_THRESHOLD, is_churn
from streamflow.server import converters, metrics
from streamflow.server.domain import ModelRef, Prediction, ReloadFailure
from streamflow.server.features import FeatureRow
from streamflow.server.loaded_model import LoadedModel, ModelSource
from streamflow.server.logs import event
from streamflow.server.prediction_log import AwaitingShadow
from streamflow.server.supervised import SupervisedThread

log = logging.getLogger(__name__)

DELTA_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Upper bounds of the |Δp| histogram (the first holds exact agreement); the contract names them."""
QUEUE_USERS = 10_000
"""Users waiting for the shadow at most (ten 1,000-user batches); past it a call's users are dropped and
counted."""
MAX_SCORED_USERS = 1024
"""Users the thread scores in one shadow run at most (calls waiting together are scored together)."""
GATHER_S = 0.05
"""How long the thread lets calls gather after the first one it takes, so that one shadow run (and its fixed
cost: building columns, the runtime's call, counting) serves many users even when calls come one at a time."""
REPORT_S = 0.5
"""How often a process writes its tallies for the others (when they changed)."""

SHADOW_USERS = Counter(
    "streamflow_shadow_users_total",
    "Users scored by both the shadow and the answering model.",
    ("shadow_version", "production_version"),
)
SHADOW_AGREEMENTS = Counter(
    "streamflow_shadow_agreements_total",
    "Users given the same label by the shadow and the answering model.",
    ("shadow_version", "production_version"),
)
SHADOW_DELTA = Histogram(
    "streamflow_shadow_abs_delta",
    "|shadow churn probability - answering churn probability| of each compared user.",
    ("shadow_version", "production_version"),
    buckets=DELTA_BUCKETS,
)
SHADOW_DROPPED = Counter(
    "streamflow_shadow_dropped_total",
    "Sampled users the shadow did not compare, by reason (queue_full, error, unloaded).",
    ("reason",),
)


@dataclass
class Tally:
    """What a shadow version learnt beside one answering version."""

    users: int = 0
    agreements: int = 0
    delta_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(DELTA_BUCKETS))
    """Users per |Δp| bucket: bucket i holds DELTA_BUCKETS[i-1] < |Δp| <= DELTA_BUCKETS[i]."""

    def add(self, production: np.ndarray, shadow: np.ndarray) -> np.ndarray:
        """Count the users scored `production` and `shadow`; returns their |Δp|."""
        deltas = np.abs(shadow.astype(np.float64) - production.astype(np.float64))
        self.users += len(deltas)
        self.agreements += int(np.count_nonzero((production > CHURN_THRESHOLD) == (shadow > CHURN_THRESHOLD)))
        self.delta_sum += float(deltas.sum())
        indices = np.minimum(np.searchsorted(DELTA_BUCKETS, deltas, side="left"), len(DELTA_BUCKETS) - 1)
        counts = np.bincount(indices, minlength=len(DELTA_BUCKETS)).tolist()
        self.buckets = [a + b for a, b in zip(self.buckets, counts, strict=True)]
        return deltas

    def merge(self, other: Tally) -> None:
        self.users += other.users
        self.agreements += other.agreements
        self.delta_sum += other.delta_sum
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]

    @property
    def label_agreement(self) -> float:
        return self.agreements / self.users if self.users else 0.0

    @property
    def mean_abs_delta(self) -> float:
        return self.delta_sum / self.users if self.users else 0.0

    @property
    def p99_abs_delta(self) -> float:
        """The smallest bucket bound that at least 99% of the users' |Δp| are at or below."""
        needed = math.ceil(0.99 * self.users)
        seen = 0
        for bound, count in zip(DELTA_BUCKETS, self.buckets, strict=True):
            seen += count
            if seen >= needed:
                return bound
        return DELTA_BUCKETS[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "agreements": self.agreements,
            "delta_sum": self.delta_sum,
            "buckets": self.buckets,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        buckets = [int(b) for b in data["buckets"]]
        if len(buckets) != len(DELTA_BUCKETS):
            raise ValueError("a tally of other buckets")
        return cls(int(data["users"]), int(data["agreements"]), float(data["delta_sum"]), buckets)


Offered = tuple[LoadedModel, Sequence[FeatureRow], np.ndarray, list[AwaitingShadow] | None]
"""A scoring call's model, the users it read, the probabilities it answered and, with the prediction log on,
each user's log record waiting for the shadow's result."""

Pair = tuple[str, str]
"""(shadow version, answering version)."""


@dataclass
class Totals:
    """A server's (or a process's) shadow counts."""

    tallies: dict[Pair, Tally] = field(default_factory=dict)
    dropped: int = 0

    def merge(self, other: Totals) -> None:
        for pair, tally in other.tallies.items():
            self.tallies.setdefault(pair, Tally()).merge(tally)
        self.dropped += other.dropped

    def to_json(self) -> str:
        return json.dumps(
            {
                "dropped": self.dropped,
                "tallies": [[s, p, t.to_json()] for (s, p), t in sorted(self.tallies.items())],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Totals:
        data = json.loads(text)
        return cls(
            {(str(s), str(p)): Tally.from_json(t) for s, p, t in data["tallies"]}, int(data["dropped"])
        )


def read_totals(directory: Path, skip: str | None = None) -> Totals:
    """The sum of the tallies every process wrote into `directory` (but the file named `skip`); a file
    being replaced or unreadable is left out this time."""
    totals = Totals()
    try:
        files = [p for p in directory.iterdir() if p.suffix == ".json" and p.name != skip]
    except OSError:
        return totals
    for path in files:
        try:
            totals.merge(Totals.from_json(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            log.debug("unreadable shadow tallies in %s", path, exc_info=True)
    return totals


@dataclass(frozen=True)
class ShadowReport:
    """What ModelInfo reports of the shadow: the server's totals and the shadow version now."""

    model_uri: str
    model: ModelRef | None
    sample: float
    totals: Totals
    last_reload_failure: ReloadFailure | None


class ShadowModel(ModelSource):
    """The shadow model of a worker, as its control plane sends it (server/model_follower.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.evidence_dir: Path | None = None

    def start(self) -> None:
        """Nothing to follow: the worker's follower sets the model."""

    def stop(self) -> None:
        """Nothing to stop."""

    def set(self, model: LoadedModel | None, failure: ReloadFailure | None, evidence_dir: Path) -> None:
        self.evidence_dir = evidence_dir
        self._last_failure = failure
        if model is not None and model is not self._current:
            self._current = model
            self._notify(model)


class Companion(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class ShadowScorer:
    """Scores sampled users with the shadow, off the response path, and keeps what it learns."""

    def __init__(
        self,
        model_uri: str,
        sample: float,
        source: ModelSource,
        evidence_dir: Path | None = None,
        queue_users: int = QUEUE_USERS,
        logged: bool = False,
    ) -> None:
        """`source` follows the shadow (a watcher of its own, or a worker's `ShadowModel`, whose control
        plane names the evidence folder); `evidence_dir` is where this process writes its tallies (None: a
        `ShadowModel`'s, else kept in memory only); `logged`: the prediction log is on, so the shadow's
        results go into it."""
        self.model_uri = model_uri
        self.sample = sample
        self.source = source
        self._logged = logged
        self._evidence_dir = evidence_dir
        self._queue: queue.SimpleQueue[Offered] = queue.SimpleQueue()
        self._queue_users = queue_users
        self._queued = 0  # users in the queue: added by the calls' threads, taken by the scoring thread
        self._queued_lock = threading.Lock()
        self._lock = threading.Lock()  # the tallies: counted by the thread, read by ModelInfo
        self._totals = Totals()
        self._written: str | None = None
        self._random = random.Random()
        self._stopping = threading.Event()
        self._thread = SupervisedThread(
            "shadow-scorer", self._run, self._stopping, "shadow_scorer_restarted", log, "shadow scoring"
        )
        self._failing = False
        self.companions: list[Companion] = []
        """Started and stopped with the scorer (a single-process server's evidence recorder)."""

    # --- the request path: never raises, never blocks ---------------------------------------------------
    def offer(
        self, production: LoadedModel, rows: Sequence[FeatureRow], probabilities: np.ndarray
    ) -> list[AwaitingShadow | None] | None:
        """Queue the sampled users of a scoring call for the shadow; a full queue drops them (counted).

        With the prediction log on, returns each row's `AwaitingShadow` (None for a row not queued), which
        the server hands its log record; None when no row waits for the shadow."""
        try:
            if not rows:
                return None
            count = len(rows)
            kept: Sequence[int] = range(count)
            if self.sample < 1.0:
                kept = [i for i in kept if self._random.random() < self.sample]
                if not kept:
                    return None
                rows = [rows[i] for i in kept]
                probabilities = probabilities[kept]
            with self._queued_lock:
                full = self._queued + len(rows) > self._queue_users
                if not full:
                    self._queued += len(rows)
            if full:
                self._dropped("queue_full", len(rows))
                return None
            awaiting = [AwaitingShadow() for _ in rows] if self._logged else None
            self._queue.put_nowait((production, rows, probabilities, awaiting))
        except Exception:
            log.debug("offering users to the shadow failed", exc_info=True)
            return None
        if awaiting is None:
            return None
        slots: list[AwaitingShadow | None] = [None] * count
        for index, pending in zip(kept, awaiting, strict=True):
            slots[index] = pending
        return slots

    # --- the scoring thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self.source.start()
        self._thread.start()
        for companion in self.companions:
            companion.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self.source.stop()
        self._write()
        for companion in self.companions:
            companion.stop()

    @property
    def alive(self) -> bool:
        return self._thread.alive

    def _run(self) -> None:
        written_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                first = self._queue.get(timeout=REPORT_S)
            except queue.Empty:
                first = None
            if first is not None:
                self._stopping.wait(GATHER_S)  # cut short by a stop, which scores what is queued
                self._take(first)
            if time.monotonic() - written_at >= REPORT_S:
                self._write()
                written_at = time.monotonic()
        while True:  # stopped after the last call answered: what it queued is scored too
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                return
            self._take(first)

    def _take(self, first: Offered) -> None:
        items = self._together(first)
        with self._queued_lock:
            self._queued -= sum(len(item[1]) for item in items)
        try:
            self._score(items)
        finally:  # the log records of users not compared (an error, no shadow loaded) go without a result
            for *_, awaiting in items:
                for pending in awaiting or ():
                    pending.compared(None)

    def _together(self, first: Offered) -> list[Offered]:
        """`first` and the calls waiting behind it, up to `MAX_SCORED_USERS` users."""
        items = [first]
        users = len(first[1])
        while users < MAX_SCORED_USERS:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            users += len(item[1])
        return items

    def _score(self, items: list[Offered]) -> None:
        shadow = self.source.current
        users = sum(len(item[1]) for item in items)
        if shadow is None:  # none loaded yet (or it never loads): nothing to compare with
            self._dropped("unloaded", users)
            return
        try:
            # Consecutive calls answered by one model are scored in one run.
            groups: list[tuple[LoadedModel, list[FeatureRow], list[np.ndarray], list[AwaitingShadow]]] = []
            for production, rows, probabilities, awaiting in items:
                if not groups or groups[-1][0] is not production:
                    groups.append((production, [], [], []))
                groups[-1][1].extend(rows)
                groups[-1][2].append(probabilities)
                groups[-1][3].extend(awaiting or ())
            for production, rows, parts, awaiting in groups:
                self._compare(shadow, production, rows, np.concatenate(parts), awaiting)
        except Exception:
            self._dropped("error", users)
            if not self._failing:
                log.exception(
                    "the shadow %s version %s failed to score; the answers are not affected",
                    shadow.ref.name,
                    shadow.ref.version,
                    extra=event("shadow_failing", shadow_version=shadow.ref.version),
                )
            self._failing = True
            return
        if self._failing:
            log.info(
                "the shadow scores again", extra=event("shadow_recovered", shadow_version=shadow.ref.version)
            )
            self._failing = False

    def _compare(
        self,
        shadow: LoadedModel,
        production: LoadedModel,
        rows: list[FeatureRow],
        probabilities: np.ndarray,
        awaiting: list[AwaitingShadow],
    ) -> None:
        """Score `rows` with the shadow and count; `awaiting` (empty, or one per row) gets each result."""
        if shadow.reader.schema == production.reader.schema:
            shadow_rows = rows  # the same features: the values the answer was built from
        else:  # other features: the shadow reads its own (here, off the response path), for the same users
            read = shadow.reader.read([row.user_id for row in rows])
            usable = [i for i, item in enumerate(read) if isinstance(item, FeatureRow)]
            shadow_rows = [read[i] for i in usable]  # type: ignore[misc]
            probabilities = probabilities[usable]
            awaiting = [awaiting[i] for i in usable] if awaiting else []
        if not shadow_rows:
            return
        scored = shadow.model.predict_proba(shadow.reader.columns(shadow_rows))[:, CHURN_CLASS]
        pair = (shadow.ref.version, production.ref.version)
        with self._lock:
            deltas = self._totals.tallies.setdefault(pair, Tally()).add(probabilities, scored)
        agreements = int(np.count_nonzero((probabilities > CHURN_THRESHOLD) == (scored > CHURN_THRESHOLD)))
        SHADOW_USERS.labels(*pair).inc(len(deltas))
        SHADOW_AGREEMENTS.labels(*pair).inc(agreements)
        metrics.observe_all(SHADOW_DELTA.labels(*pair), deltas)
        if not awaiting:
            return
        for pending, row, probability in zip(awaiting, shadow_rows, scored.tolist(), strict=True):
            result = Prediction(row.user_id, is_churn(probability), probability, shadow.ref, features=())
            pending.compared(converters.prediction(result).SerializeToString())

    def _dropped(self, reason: str, users: int) -> None:
        with self._lock:
            self._totals.dropped += users
        SHADOW_DROPPED.labels(reason).inc(users)

    # --- what is learnt -----------------------------------------------------------------------------------
    def _directory(self) -> Path | None:
        if self._evidence_dir is not None:
            return self._evidence_dir
        return getattr(self.source, "evidence_dir", None)

    def _own(self) -> Totals:
        with self._lock:
            return Totals.from_json(self._totals.to_json())

    def _write(self) -> None:
        """Write this process's tallies for the others, when they changed since last time."""
        directory = self._directory()
        if directory is None:
            return
        text = self._own().to_json()
        if text == self._written:
            return
        try:
            temporary = directory / f".{os.getpid()}.tmp"
            temporary.write_text(text)
            os.replace(temporary, directory / f"{os.getpid()}.json")  # readers see a whole file or none
            self._written = text
        except OSError:
            log.warning("cannot write the shadow's tallies into %s", directory, exc_info=True)

    def totals(self) -> Totals:
        """The server's totals: this process's own, now, and every other process's last report."""
        own = self._own()
        directory = self._directory()
        if directory is None:
            return own
        totals = read_totals(directory, skip=f"{os.getpid()}.json")
        totals.merge(own)
        return totals

    def report(self) -> ShadowReport:
        shadow = self.source.current
        return ShadowReport(
            model_uri=self.model_uri,
            model=None if shadow is None else shadow.ref,
            sample=self.sample,
            totals=self.totals(),
            last_reload_failure=self.source.last_failure,
        )
