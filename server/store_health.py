"""A circuit breaker in front of the online store: an outage costs callers one timeout, not one each.

While the store answers, every read goes through (closed). The first read that cannot reach it opens the
breaker and logs the outage once; from then on reads fail at once with `FeatureStoreUnavailable`, except one
probe read let through every `probe_interval_s`. The probe's success closes the breaker and logs the
recovery once, with how long the store was away and how many reads failed meanwhile. Nothing is logged per
failing read. Reads run on several threads at once, so the state sits behind one lock, held only to decide,
never during a read. A read let through before the last change of state (it opened or closed meanwhile) is
only counted: a late answer of a read that was already on its way cannot close or reopen the breaker, so an
outage is one WARNING and one INFO however the threads interleave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from streamflow.server import metrics
from streamflow.server.errors import FeatureStoreUnavailable
from streamflow.server.logs import event

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoreBreaker:
    """Guards the reads of one online store; shared by every thread and model that reads it."""

    def __init__(
        self,
        store_type: str,
        unreachable: tuple[type[BaseException], ...],
        probe_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store_type = store_type
        self._unreachable = unreachable
        self._probe_interval_s = probe_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None  # None while closed
        self._epoch = 0  # counts changes of state; a read's outcome changes state only in its own epoch
        self._next_probe = 0.0
        self._probing = False
        self._failed_reads = 0

    @property
    def is_open(self) -> bool:
        """Whether the store is taken for down (reads fail fast)."""
        with self._lock:
            return self._down_since is not None

    def call(self, read: Callable[[], T]) -> T:
        """`read()`, or `FeatureStoreUnavailable` when the store is down or the read cannot reach it."""
        epoch, probe = self._admit()
        try:
            result = read()
        except self._unreachable as exc:
            self._failed(exc, epoch, probe)
            metrics.store_error(self.store_type)
            raise FeatureStoreUnavailable(self.store_type) from exc
        except BaseException:
            # The store answered, but something else went wrong: no verdict on the store.
            if probe:
                with self._lock:
                    self._probing = False
            raise
        if probe:  # only the probe closes the breaker; nothing else is let through while it is open
            self._recovered()
        return result

    def _admit(self) -> tuple[int, bool]:
        """Let a read through (returns its epoch and whether it is the probe), or fail it fast while open."""
        with self._lock:
            if self._down_since is None:
                return self._epoch, False
            if not self._probing and self._clock() >= self._next_probe:
                self._probing = True
                return self._epoch, True
            self._failed_reads += 1
        metrics.store_error(self.store_type)
        raise FeatureStoreUnavailable(self.store_type)

    def _failed(self, exc: BaseException, epoch: int, probe: bool) -> None:
        with self._lock:
            now = self._clock()
            if probe:
                self._probing = False
                self._next_probe = now + self._probe_interval_s
            if self._down_since is not None:
                self._failed_reads += 1  # a failure during the outage, whenever it was let through
                return
            if epoch != self._epoch:
                return  # let through before the store recovered: says nothing about the store now
            self._epoch += 1
            self._down_since = now
            self._failed_reads = 1
            self._next_probe = now + self._probe_interval_s
        log.warning(
            "the %s online store is unreachable (%s: %s); reads fail at once with FEATURE_STORE_UNAVAILABLE, "
            "one probe read every %g s, until it answers",
            self.store_type,
            type(exc).__name__,
            exc,
            self._probe_interval_s,
            extra=event("store_outage", store=self.store_type, error=f"{type(exc).__name__}: {exc}"),
        )

    def _recovered(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            down_s = self._clock() - self._down_since
            failed = self._failed_reads
            self._epoch += 1
            self._down_since = None
            self._probing = False
            self._failed_reads = 0
        log.info(
            "the %s online store answers again after %.1f s unreachable; %d read(s) failed meanwhile",
            self.store_type,
            down_s,
            failed,
            extra=event(
                "store_recovered", store=self.store_type, down_s=round(down_s, 3), failed_reads=failed
            ),
        )


_BREAKERS: dict[str, StoreBreaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker_for(store: str, make: Callable[[], StoreBreaker]) -> StoreBreaker:
    """The one breaker of `store` (its identity: which database or servers), made on first use: the readers
    of successive model loads share it, so an outage spanning a reload is still one outage, logged once."""
    with _BREAKERS_LOCK:
        breaker = _BREAKERS.get(store)
        if breaker is None:
            breaker = _BREAKERS[store] = make()
        return breaker
