"""The call observers a server runs (server/rpc.py `CallObserver`): one place that decides, from the settings,
which cross-cutting concerns watch every call."""

from __future__ import annotations

from streamflow.server import tracing
from streamflow.server.logs import AccessLog
from streamflow.server.metrics import MetricsObserver
from streamflow.server.rpc import CallObserver
from streamflow.settings import Settings


def call_observers(settings: Settings) -> list[CallObserver]:
    """The observers of every call of a server with these settings, outermost first."""
    observers: list[CallObserver] = []
    # Tracing first: its span is current while the inner observers run, so the access line has its trace id.
    # The tracer provider is made here, in the server's own process: after the fork, for a worker.
    tracer = tracing.process_tracer()
    if tracer is not None:
        observers.append(tracing.ServerSpans(tracer))
    if settings.access_log_rate:
        observers.append(AccessLog(settings.access_log_rate, trace_ids=tracer is not None))
    observers.append(MetricsObserver())  # always: the counts cost little, and the endpoint may be off
    return observers
