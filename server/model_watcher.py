"""Follows the registry: a background thread that loads, validates and swaps in the version the URI points at.

Requests read `current` once and keep that `LoadedModel` for their whole call, so a swap (one reference
assignment) never changes a model under a running request. A version that fails to load or validate is
refused: the old model keeps serving and `last_failure` says why until another version is loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from feast import FeatureStore
from mlflow.tracking import MlflowClient

from feature_repo.store import open_store
from server.domain import ReloadFailure
from server.heap import settle_after_load
from server.model_loader import LoadedModel, ModelTarget, load_model
from streamflow.errors import StreamflowError
from streamflow.settings import Settings

log = logging.getLogger(__name__)

REFUSED_RETRY_S = 300.0
"""A refused version is tried again after this long (its artifacts may have been unreachable for a moment), or
as soon as its registry record changes (a fixed tag)."""

_MAX_REASON_CHARS = 1000


class ModelWatcher:
    """Owns the served model: polls the registry every `settings.poll_interval_s` on its own thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target = ModelTarget.parse(settings.model_uri)
        self._listeners: list[Callable[[LoadedModel], None]] = []
        self._client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        self._store: FeatureStore | None = None
        self._current: LoadedModel | None = None
        self._last_failure: ReloadFailure | None = None
        # (version, registry timestamp, monotonic time) of the last refusal, to avoid reloading it every poll.
        self._refused: tuple[str, int, float] | None = None
        self._waiting = False  # logged that the URI points at nothing yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> LoadedModel | None:
        """The model serving now, or None before the first successful load."""
        return self._current

    @property
    def last_failure(self) -> ReloadFailure | None:
        """The last version refused since the current model was loaded."""
        return self._last_failure

    def subscribe(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call `listener` on the watcher's thread after each swap, and now if a model is already loaded."""
        self._listeners.append(listener)
        if self._current is not None:
            listener(self._current)

    def start(self) -> None:
        """Poll now and then every poll interval, on a daemon thread, until `stop`."""
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; waits for a load in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.settings.poll_interval_s)

    def poll(self) -> None:
        """One look at the registry; loads and swaps in a new version when the URI points at one."""
        try:
            version = self.target.resolve(self._client)
        except Exception as exc:
            log.warning(
                "registry unreachable at %s, keeping the current model: %s", self.settings.tracking_uri, exc
            )
            return
        if version is None:
            if self._current is None and not self._waiting:
                log.warning(
                    "no version at %s yet; polling every %g s", self.target.uri, self.settings.poll_interval_s
                )
            self._waiting = True
            return
        self._waiting = False
        if version.status not in (None, "READY"):
            return  # still being registered (artifacts uploading): look again next poll
        current = self._current
        if current is not None and current.ref.version == str(version.version):
            self._current = current.with_registry_state(version)
            return
        stamp = int(version.last_updated_timestamp or 0)
        if (
            self._refused is not None
            and self._refused[:2] == (str(version.version), stamp)
            and time.monotonic() - self._refused[2] < REFUSED_RETRY_S
        ):
            return
        log.info("loading %s version %s", version.name, version.version)
        try:
            loaded = load_model(self.settings, self._client, self._feature_store(), version)
        except Exception as exc:
            expected = isinstance(exc, StreamflowError)
            reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            self._refused = (str(version.version), stamp, time.monotonic())
            self._last_failure = ReloadFailure(
                str(version.version), reason[:_MAX_REASON_CHARS], datetime.now(UTC)
            )
            log.error(
                "refused %s version %s, still serving %s: %s",
                version.name,
                version.version,
                current.ref.version if current else "nothing",
                reason,
                exc_info=not expected,
            )
            return
        settle_after_load()  # before the swap, so no request waits on the collection it runs
        self._current = loaded
        self._last_failure = None
        self._refused = None
        log.info("serving %s version %s (%s)", loaded.ref.name, loaded.ref.version, loaded.runtime)
        for listener in self._listeners:
            listener(loaded)

    def _feature_store(self) -> FeatureStore:
        """The Feast store, opened once. Loads resolve the FeatureService without the registry cache, and
        requests never read the registry (the reader resolves everything at load), so no refresh is needed."""
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store
