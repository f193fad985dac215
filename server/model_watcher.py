"""Follows the registry: a background thread that loads, validates and swaps in the version the URI points at.

Requests read `current` once and keep that `LoadedModel` for their whole call, so a swap (one reference
assignment) never changes a model under a running request. A version that fails to load or validate is
refused: the old model keeps serving and `last_failure` says why (a short fixed sentence; the log has the
detail) until another version is loaded.

The thread is supervised: a poll that raises is logged once per episode and retried with back-off, a
listener that raises is logged and skipped, and should the thread end some other way it starts its
replacement. State changes are logged once each, never once per poll: the registry becoming unreachable and
reachable again, the URI pointing at no version and at one again. While the URI points elsewhere than the
served version, the served version's own registry record is read each poll, so ModelInfo reports its real
stage and aliases.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from feast import FeatureStore
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from streamflow.errors import StreamflowError
from streamflow.feature_repo.store import close_store, open_store
from streamflow.server import metrics
from streamflow.server.domain import ReloadFailure
from streamflow.server.heap import settle_after_load
from streamflow.server.loaded_model import LoadedModel, ModelSource
from streamflow.server.logs import event
from streamflow.server.model_loader import (
    FAILED_TO_LOAD,
    NOT_FOUND_CODES,
    ModelLoadError,
    ModelTarget,
    load_model,
)
from streamflow.server.scoring_artifact import ScoringArtifact
from streamflow.settings import Settings

log = logging.getLogger(__name__)

REFUSED_RETRY_S = 300.0
"""A refused version is tried again after this long (its artifacts may have been unreachable for a moment), or
as soon as its registry record changes (a fixed tag)."""

MAX_BACKOFF_S = 60.0
"""Longest wait between two polls after failed ones (unless the poll interval itself is longer)."""


class ModelWatcher(ModelSource):
    """Owns the served model: polls the registry every `settings.poll_interval_s` on its own thread."""

    def __init__(
        self,
        settings: Settings,
        serving: bool = True,
        shadow: bool = False,
        after: ModelWatcher | None = None,
    ) -> None:
        """`serving`: this process scores with the model, so it reports it in `streamflow_model_info` (not
        so a control plane, whose workers report theirs). `shadow`: it follows the shadow model
        (server/shadow.py), and logs as `streamflow.server.model_watcher.shadow`, so that its loads are not
        read as the served model's. `after`: the first poll waits for that watcher's first, since models
        load one at a time (model_loader) and a shadow's load must not hold up the served model's at
        start-up."""
        super().__init__()
        self._log = logging.getLogger(f"{__name__}.shadow") if shadow else log
        self._model = "shadow" if shadow else "served"  # its loads' label in streamflow_model_reloads_total
        self.settings = settings
        self._serving_here = serving
        self.target = ModelTarget.parse(settings.model_uri)
        self._change_listeners: list[Callable[[], None]] = []
        self._artifact: ScoringArtifact | None = None
        self._reported: tuple[object, ...] | None = None  # what change listeners last heard of
        try:
            self._client = MlflowClient(
                tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri
            )
        except MlflowException as exc:  # an unsupported scheme or store: nothing a poll would fix
            raise StreamflowError(
                f"cannot open the MLflow registry at {settings.tracking_uri}: {exc.message.strip()}"
            ) from exc
        self._store: FeatureStore | None = None
        # (version, registry timestamp, monotonic time) of the last refusal, to avoid reloading it every poll.
        self._refused: tuple[str, int, float] | None = None
        # What was last logged, so each change is logged once: the URI points at nothing, the registry is
        # unreachable, polls in a row that raised.
        self._unresolved = False
        self._unreachable = False
        self._failures = 0
        self._stop = threading.Event()
        self._polled = threading.Event()  # set after the first poll, loaded or not
        self._after = after

    @property
    def artifact(self) -> ScoringArtifact | None:
        """The scoring artifact of the current model, with the registry state it was loaded with."""
        return self._artifact

    def subscribe_changes(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the watcher's thread after each poll that changed the model served or what
        ModelInfo reports of it (stage, aliases, the last refused version)."""
        self._change_listeners.append(listener)

    def start(self) -> None:
        """Poll now and then every poll interval, on a daemon thread, until `stop`."""
        self._start_thread(0.0)

    def stop(self) -> None:
        """Stop polling; waits for a load in progress to finish, then closes the Feast store's connections."""
        self._stop.set()
        thread = self._thread
        while thread is not None and thread is not threading.current_thread():
            thread.join()
            if thread is self._thread:
                break
            thread = self._thread  # it started a replacement before it saw the stop
        if self._store is not None:
            close_store(self._store)

    def _start_thread(self, delay: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(delay,), name="model-watcher", daemon=True)
        self._thread.start()

    def _run(self, delay: float) -> None:
        try:
            after = self._after
            while after is not None and not after._polled.wait(0.1) and not self._stop.is_set():
                pass
            while not self._stop.wait(delay):
                delay = self._guarded_poll()
                self._polled.set()
        except BaseException:
            # Only what no poll guard catches (a library's SystemExit, say) gets here; it ends this thread
            # either way, and the old model must not serve unwatched, so a new thread takes over.
            self._failures += 1
            self._log.critical(
                "the model watcher thread ended unexpectedly; starting a new one",
                exc_info=True,
                extra=event("watcher_restarted"),
            )
            if not self._stop.is_set():
                self._start_thread(self._backoff())

    def _guarded_poll(self) -> float:
        """One poll that never raises; returns the seconds to wait before the next one."""
        try:
            self.poll()
            if self._serving_here:
                metrics.model_served_by(self._current)
            self._report_changes()
        except Exception:
            self._failures += 1
            if self._failures == 1:
                self._log.exception(
                    "the model watcher failed to poll %s; still serving %s, retrying with back-off",
                    self.target.uri,
                    self._serving(),
                    extra=event("watcher_failing", model_uri=self.target.uri),
                )
            return self._backoff()
        if self._failures:
            self._log.info(
                "the model watcher polls %s again after %d failed polls",
                self.target.uri,
                self._failures,
                extra=event("watcher_recovered", model_uri=self.target.uri, failed_polls=self._failures),
            )
            self._failures = 0
        return self.settings.poll_interval_s

    def _backoff(self) -> float:
        """Seconds before the next poll after `_failures` failed ones: doubling, capped."""
        interval = self.settings.poll_interval_s
        return float(min(interval * 2 ** min(self._failures, 20), max(MAX_BACKOFF_S, interval)))

    def poll(self) -> None:
        """One look at the registry; loads and swaps in a new version when the URI points at one."""
        current = self._current
        try:
            version = self.target.resolve(self._client)
            record = self._record_of(current, version)
        except Exception as exc:
            if not self._unreachable:
                self._log.warning(
                    "registry unreachable at %s, keeping %s: %s",
                    self.settings.tracking_uri,
                    self._serving(),
                    exc,
                    extra=event("registry_unreachable", registry=self.settings.tracking_uri, error=str(exc)),
                )
            self._unreachable = True
            return
        if self._unreachable:
            self._log.info(
                "registry reachable again at %s",
                self.settings.tracking_uri,
                extra=event("registry_reachable", registry=self.settings.tracking_uri),
            )
            self._unreachable = False
        if current is not None and record is not None:
            current = self._current = current.with_registry_state(*_registry_state(record))
        self._note_resolution(version)
        if version is None:
            return
        if version.status not in (None, "READY"):
            return  # still being registered (artifacts uploading): look again next poll
        if current is not None and current.ref.version == str(version.version):
            self._current = current.with_registry_state(*_registry_state(version))
            return
        stamp = int(version.last_updated_timestamp or 0)
        if (
            self._refused is not None
            and self._refused[:2] == (str(version.version), stamp)
            and time.monotonic() - self._refused[2] < REFUSED_RETRY_S
        ):
            return
        self._log.info(
            "loading %s version %s",
            version.name,
            version.version,
            extra=event("model_loading", model_name=version.name, model_version=str(version.version)),
        )
        try:
            artifact, loaded = load_model(self.settings, self._client, self._feature_store(), version)
        except Exception as exc:
            self._refuse(version, stamp, exc)
            return
        settle_after_load()  # before the swap, so no request waits on the collection it runs
        self._artifact = artifact
        self._current = loaded
        self._last_failure = None
        self._refused = None
        metrics.model_reload(self._model, "loaded")
        self._log.info(
            "serving %s version %s (%s)",
            loaded.ref.name,
            loaded.ref.version,
            loaded.runtime,
            # The first model is loaded; any later one swaps out the version served until now.
            extra=event(
                "model_loaded" if current is None else "model_swapped",
                model_name=loaded.ref.name,
                model_version=loaded.ref.version,
                runtime=str(loaded.runtime),
                previous_version=None if current is None else current.ref.version,
            ),
        )
        self._notify(loaded)

    def _record_of(self, current: LoadedModel | None, version: ModelVersion | None) -> ModelVersion | None:
        """The served version's registry record when the URI points elsewhere (its stage may have changed);
        None when the URI points at it (its record is `version`) or it was deleted."""
        if current is None or (version is not None and str(version.version) == current.ref.version):
            return None
        try:
            return self._client.get_model_version(current.ref.name, current.ref.version)
        except MlflowException as exc:
            if exc.error_code in NOT_FOUND_CODES:
                return None
            raise

    def _note_resolution(self, version: ModelVersion | None) -> None:
        """Log once when the URI stops pointing at a version, and once when it points at one again."""
        if version is None and not self._unresolved:
            current = self._current
            if current is None:
                self._log.warning(
                    "no version at %s yet; polling every %g s",
                    self.target.uri,
                    self.settings.poll_interval_s,
                    extra=event("model_unresolved", model_uri=self.target.uri, model_version=None),
                )
            else:
                self._log.warning(
                    "%s no longer points at any version; still serving version %s, now in stage %s",
                    self.target.uri,
                    current.ref.version,
                    current.stage,
                    extra=event(
                        "model_unresolved", model_uri=self.target.uri, model_version=current.ref.version
                    ),
                )
        elif version is not None and self._unresolved:
            self._log.info(
                "%s points at version %s again",
                self.target.uri,
                version.version,
                extra=event("model_resolved", model_uri=self.target.uri, model_version=str(version.version)),
            )
        self._unresolved = version is None

    def _refuse(self, version: ModelVersion, stamp: int, exc: Exception) -> None:
        """Keep the current model; the log gets the detail, ModelInfo a short sentence without it."""
        expected = isinstance(exc, StreamflowError)
        reason = exc.reason if isinstance(exc, ModelLoadError) else FAILED_TO_LOAD
        self._refused = (str(version.version), stamp, time.monotonic())
        metrics.model_reload(self._model, "refused")
        self._last_failure = ReloadFailure(str(version.version), reason, datetime.now(UTC))
        self._log.error(
            "refused %s version %s, still serving %s: %s",
            version.name,
            version.version,
            self._serving(),
            exc if expected else f"{type(exc).__name__}: {exc}",
            exc_info=not expected,
            extra=event(
                "model_refused",
                model_name=version.name,
                model_version=str(version.version),
                reason=reason,
                serving=self._serving(),
            ),
        )

    def _report_changes(self) -> None:
        """Tell each change listener when the model served or its reported state changed since last time."""
        current = self._current
        state = (
            None if current is None else (current.ref, current.loaded_at, current.stage, current.aliases),
            self._last_failure,
        )
        if state == self._reported:
            return
        self._reported = state
        for listener in list(self._change_listeners):
            try:
                listener()
            except Exception:
                self._log.exception("a listener of model changes failed; the watcher goes on")

    def _serving(self) -> str:
        current = self._current
        return "nothing" if current is None else f"version {current.ref.version}"

    def _feature_store(self) -> FeatureStore:
        """The Feast store, opened once. Loads resolve the FeatureService without the registry cache, and
        requests never read the registry (the reader resolves everything at load), so no refresh is needed."""
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store


def _registry_state(version: ModelVersion) -> tuple[str, tuple[str, ...]]:
    """The stage and aliases the registry gives a version."""
    return version.current_stage or "None", tuple(sorted(version.aliases or ()))
