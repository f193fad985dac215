"""The shadow's evidence, where `streamflow promote` can read it without a server address: the registry.

The process that follows the registry (the supervisor, or a single-process server) sums the server's shadow
tallies (server/shadow.py) every poll interval. When they changed it logs one summary line per (shadow
version, Production version) and records them as a tag on the shadow's model version,
`shadow_evidence.<Production version>.<run>` (a `ShadowEvidence` as JSON, streamflow/model_contract.py), which
`streamflow promote VERSION --stage Production --min-shadow-users N --min-agreement X` checks, summed over
every run's tag: a restarted server, or another replica, adds its users instead of replacing them. A registry
that cannot be written to is logged once and tried again next time; the tallies are cumulative, so nothing
is lost meanwhile.

It imports MLflow: never imported by a scoring worker.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from mlflow.tracking import MlflowClient

from streamflow.model_contract import ShadowEvidence
from streamflow.server.logs import event
from streamflow.server.model_loader import ModelTarget
from streamflow.server.model_watcher import ModelWatcher
from streamflow.server.shadow import Pair, ShadowScorer, Tally, Totals
from streamflow.server.supervised import SupervisedThread
from streamflow.settings import Settings

log = logging.getLogger(__name__)


def shadow_watcher(settings: Settings, served: ModelWatcher) -> ModelWatcher | None:
    """A watcher following `settings.shadow_model_uri` as `served` follows the served URI, polling first
    after it; None without one."""
    if not settings.shadow_model_uri:
        return None
    shadow = settings.model_copy(update={"model_uri": settings.shadow_model_uri})
    return ModelWatcher(shadow, serving=False, shadow=True, after=served)


def single_process_shadow(settings: Settings, served: ModelWatcher) -> ShadowScorer | None:
    """The shadow of a single-process server: its own watcher, scorer and evidence recorder."""
    watcher = shadow_watcher(settings, served)
    if watcher is None:
        return None
    scorer = ShadowScorer(
        settings.shadow_model_uri, settings.shadow_sample, watcher, logged=settings.prediction_log
    )
    scorer.companions.append(EvidenceRecorder(settings, scorer.totals))
    return scorer


class EvidenceRecorder:
    """Logs and records the server's shadow totals every poll interval, on a supervised thread."""

    def __init__(self, settings: Settings, totals: Callable[[], Totals]) -> None:
        self.settings = settings
        self.model_name = ModelTarget.parse(settings.shadow_model_uri).name
        self._totals = totals
        self._client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        self._recorded: dict[Pair, Tally] = {}
        # This run's part of the evidence: its start time, and a random part for replicas started at once.
        self.run = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        self._failing = False
        self._stopping = threading.Event()
        self._thread = SupervisedThread(
            "shadow-evidence", self._run, self._stopping, "shadow_evidence_restarted", log, "shadow evidence"
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop, after recording the last totals."""
        self._stopping.set()
        self._thread.join()
        self.record()

    @property
    def alive(self) -> bool:
        return self._thread.alive

    def _run(self) -> None:
        while not self._stopping.wait(self.settings.poll_interval_s):
            self.record()

    def record(self) -> None:
        """Log and record each pair whose tally changed since it was last recorded; never raises."""
        try:
            totals = self._totals()
        except Exception:
            log.exception("cannot sum the shadow's tallies")
            return
        for pair, tally in sorted(totals.tallies.items()):
            if self._recorded.get(pair) == tally:
                continue
            shadow_version, production_version = pair
            log.info(
                "shadow %s version %s beside Production version %s: %d users compared, label agreement "
                "%.2f%%, mean |dp| %.4f, p99 |dp| <= %g; %d users dropped",
                self.model_name,
                shadow_version,
                production_version,
                tally.users,
                100 * tally.label_agreement,
                tally.mean_abs_delta,
                tally.p99_abs_delta,
                totals.dropped,
                extra=event(
                    "shadow_summary",
                    shadow_version=shadow_version,
                    production_version=production_version,
                    users=tally.users,
                    label_agreement=round(tally.label_agreement, 6),
                    mean_abs_delta=round(tally.mean_abs_delta, 6),
                    p99_abs_delta=tally.p99_abs_delta,
                    dropped=totals.dropped,
                ),
            )
            evidence = ShadowEvidence(
                production_version=production_version,
                users=tally.users,
                label_agreement=tally.label_agreement,
                mean_abs_delta=tally.mean_abs_delta,
                p99_abs_delta=tally.p99_abs_delta,
                recorded_at=datetime.now(UTC).isoformat(),
                run=self.run,
            )
            try:
                self._client.set_model_version_tag(
                    self.model_name, shadow_version, evidence.tag, evidence.to_json()
                )
            except Exception as exc:
                if not self._failing:
                    log.warning(
                        "cannot record the shadow's evidence on %s version %s, trying again in %g s: %s",
                        self.model_name,
                        shadow_version,
                        self.settings.poll_interval_s,
                        exc,
                        extra=event("shadow_evidence_failing", shadow_version=shadow_version),
                    )
                self._failing = True
                continue
            self._failing = False
            self._recorded[pair] = tally
