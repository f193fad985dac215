"""The call observers a server runs (server/rpc.py `CallObserver`): one place that decides, from the settings,
which cross-cutting concerns watch every call."""

from __future__ import annotations

from server.logs import AccessLog
from server.metrics import MetricsObserver
from server.rpc import CallObserver
from streamflow.settings import Settings


def call_observers(settings: Settings) -> list[CallObserver]:
    """The observers of every call of a server with these settings, outermost first."""
    observers: list[CallObserver] = []
    if settings.access_log_rate:
        observers.append(AccessLog(settings.access_log_rate))
    observers.append(MetricsObserver())  # always: the counts cost little, and the endpoint may be off
    return observers
