"""OpenTelemetry traces: a server span per call, child spans for the feature read, inference and response
building.

Off unless the OTel SDK's own variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_TRACES_EXPORTER`
(`otlp`, `console`; `none` or `OTEL_SDK_DISABLED=true` keep it off). `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_PROPAGATORS` and the exporter's `OTEL_EXPORTER_OTLP_*` variables work as the
SDK documents them. Off, no span object is ever built: every call site checks one module global first.

One tracer provider per process, made by the first server of the process (`process_tracer`), so each forked
worker makes its own after the fork (a BatchSpanProcessor's thread does not survive one); `shutdown` flushes
it when the process drains.

Coalesced Predicts: one scoring run serves several calls. Its spans hang under one `streamflow.predict_batch`
span, a child of the first call's server span with a link to every other call's server span and the batch
size as an attribute; so each call's trace either holds the scoring or links to it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from streamflow.server.rpc import Call

DEFAULT_SERVICE_NAME = "streamflow-serving"
"""`service.name` of the spans unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one."""

# gRPC codes that make a server span an error (OpenTelemetry's gRPC semantic conventions): the others are
# the caller's mistakes, not the server's.
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

MODEL_VERSION = "streamflow.model_version"
"""Span attribute: the registry version of the model that answered."""
USERS = "streamflow.users"
"""Span attribute: how many users a call or a step concerns."""

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None
"""The process's tracer; None while tracing is off, which every call site checks first."""


def enabled_by_environment() -> bool:
    """Whether the OTel variables of this process ask for traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())


def start(processor: SpanProcessor | None = None) -> trace.Tracer:
    """Make this process's tracer provider: with `processor` (tests pass the SDK's in-memory exporter), else
    a batch processor over the exporter `OTEL_TRACES_EXPORTER` names (default `otlp`, over gRPC)."""
    global _provider, _tracer
    shutdown()
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor or BatchSpanProcessor(_exporter()))
    _provider, _tracer = provider, provider.get_tracer("streamflow.serving")
    return _tracer


def _exporter() -> SpanExporter:
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: this server exports with `otlp` or `console`")
    # Imported only when used: the OTLP exporter pulls in its own gRPC client code.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def process_tracer() -> trace.Tracer | None:
    """This process's tracer, made on first use when the environment asks for traces; None when off."""
    if _tracer is None and enabled_by_environment():
        start()
    return _tracer


def shutdown() -> None:
    """Flush and end this process's spans (on drain); tracing is off afterwards."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


_NOTHING = nullcontext()


def span(name: str, model_version: str, users: int) -> AbstractContextManager[object]:
    """A child span of the current one for a step of a call, with the model version and the number of users
    it concerns; nothing at all when tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes={MODEL_VERSION: model_version, USERS: users})


def current_span_context() -> SpanContext | None:
    """The current span's context, to link a coalesced batch to its calls; None when tracing is off."""
    if _tracer is None:
        return None
    return trace.get_current_span().get_span_context()


def current_trace_id() -> str:
    """The current trace id as 32 hex digits, or "" when there is none."""
    trace_id = trace.get_current_span().get_span_context().trace_id
    return format(trace_id, "032x") if trace_id else ""


def batch_span(calls: Sequence[SpanContext | None]) -> AbstractContextManager[object]:
    """The span of one coalesced scoring run for `calls` (their server spans, in batch order): a child of
    the first, linked to the others. Nothing when tracing is off."""
    if _tracer is None:
        return _NOTHING
    spans = [c for c in calls if c is not None and c.is_valid]
    parent = trace.set_span_in_context(trace.NonRecordingSpan(spans[0])) if spans else None
    return _tracer.start_as_current_span(
        "streamflow.predict_batch",
        context=parent,
        links=[Link(c) for c in spans[1:]],
        attributes={"streamflow.batch_size": len(calls)},
    )


_SERVER_SPAN: ContextVar[tuple[trace.Span, Token[otel_context.Context]]] = ContextVar(
    "streamflow_server_span"
)


class ServerSpans:
    """Call observer: a SERVER span per call that continues the caller's W3C `traceparent`, current while
    the handler runs (so child spans and the access log's trace id find it)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def started(self, call: Call) -> None:
        carrier = {key: value for key, value in call.context.invocation_metadata() or ()}
        parent = propagate.extract(carrier)
        server_span = self._tracer.start_span(
            f"{call.service}/{call.method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": call.service, "rpc.method": call.method},
        )
        token = otel_context.attach(trace.set_span_in_context(server_span, parent))
        _SERVER_SPAN.set((server_span, token))

    def finished(self, call: Call) -> None:
        server_span, token = _SERVER_SPAN.get()
        code = call.code
        server_span.set_attribute("rpc.grpc.status_code", code.value[0])
        server_span.set_attribute("streamflow.request_id", call.request_id)
        if call.model_version:
            server_span.set_attribute(MODEL_VERSION, call.model_version)
        if call.users:
            server_span.set_attribute(USERS, call.users)
        if code.name in _SERVER_ERRORS:
            server_span.set_status(Status(StatusCode.ERROR, code.name))
        otel_context.detach(token)
        server_span.end()
