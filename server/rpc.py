"""The one layer every call of the server passes through, between grpc and the servicers.

It registers each service's methods itself, with the request left as bytes, so that for every call:

- the request is decoded here: bytes that are not a valid request message (invalid UTF-8 in a string,
  random bytes) are INVALID_ARGUMENT `MALFORMED_REQUEST`, where grpc would answer UNKNOWN with a Python
  class name and log a traceback per call;
- the caller is named (`server/auth.py`: a bearer token's name, else the client certificate's subject) and,
  where the server asks for tokens, a call without a valid one is UNAUTHENTICATED before its bytes are read;
- a caller over its quota of users scored per second gets RESOURCE_EXHAUSTED `RATE_LIMITED` with
  `QuotaFailure` and `RetryInfo` (`server/quotas.py`);
- admission control caps the PredictionService calls running at once (`settings.max_concurrent_rpcs`); the
  excess gets a retryable RESOURCE_EXHAUSTED `OVERLOADED` with `RetryInfo`. Health is never counted, so probes
  answer under any flood (grpc's own `maximum_concurrent_rpcs` counted them, and answered some rejected calls
  CANCELLED);
- a `ServingError` becomes its status from the error table, anything else INTERNAL with a request id; every
  status is cut to fit a default client's metadata limit (`errors.bounded`);
- the time of the last arrival is kept, so a drain can wait until every call the server received has been
  dispatched before grpc's shutdown cancels the undispatched ones (`quiesce`).

Servicers stay domain calls: a method takes the decoded request and returns the response or raises.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from streamflow.server.auth import ANONYMOUS, UNAUTHENTICATED, Authenticator
from streamflow.server.errors import (
    MalformedRequest,
    Overloaded,
    ServingError,
    Unauthenticated,
    bounded,
    internal_status,
    row_of,
    status_of,
)
from streamflow.server.log_limits import ThrottledLog
from streamflow.server.quotas import RateLimiter

log = logging.getLogger(__name__)

Method = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamMethod = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Any]]


@dataclass(frozen=True)
class Policy:
    """What the guard does for the calls of one service beyond decoding and error mapping."""

    admit: bool = False
    """Count the calls against `max_concurrent_rpcs`."""
    authenticate: bool = False
    """Ask for a token (when the server has tokens); health never does."""
    cost: Callable[[Any], int] | None = None
    """Users a decoded request scores, counted against the caller's quota; None: no quota."""


@dataclass
class Call:
    """One call as the cross-cutting concerns see it. The guard fills in what grpc knows; the servicer adds
    what only the domain knows (the model version that answered, how many users were scored)."""

    service: str
    """e.g. `streamflow.serving.v1.PredictionService`."""
    method: str
    """e.g. `Predict`."""
    context: grpc.aio.ServicerContext
    started: float = field(default_factory=time.perf_counter)
    code: grpc.StatusCode = grpc.StatusCode.OK
    model_version: str = ""
    users: int = 0
    caller: str = ANONYMOUS
    """Who called: a token's name, a client certificate's subject, `anonymous`, or `unauthenticated`."""

    @functools.cached_property
    def request_id(self) -> str:
        """A fresh id per call, made when first asked for: a written access line, a span, an INTERNAL
        error or the prediction log needs it."""
        return _RequestIds.next()

    @property
    def seconds(self) -> float:
        """Time since the call reached the guard."""
        return time.perf_counter() - self.started


class _RequestIds:
    """32 hex characters like a UUID4's, unique across processes and calls: a random prefix per process and
    a counter. uuid4 read the kernel's random source on every call, 4% of a worker's time with the
    prediction log on (which asks every call for its id)."""

    _prefix = secrets.token_hex(8)
    _counter = itertools.count()

    @classmethod
    def next(cls) -> str:
        return f"{cls._prefix}{next(cls._counter):016x}"

    @classmethod
    def renew(cls) -> None:
        """A forked child's own prefix."""
        cls._prefix, cls._counter = secrets.token_hex(8), itertools.count()


os.register_at_fork(after_in_child=_RequestIds.renew)

CURRENT_CALL: ContextVar[Call] = ContextVar("streamflow_call")
"""The call the running handler serves (set by the guard for the handler's task)."""


class CallObserver(Protocol):
    """A cross-cutting concern (metrics, access log, tracing): told when each call starts and ends.

    Both run on the event loop in the call's task, so `started` may set context (a span) that the handler
    sees and `finished` resets; they must be cheap: they sit on every call."""

    def started(self, call: Call) -> None: ...

    def finished(self, call: Call) -> None: ...


class CallGuard:
    """Per process: names callers, takes their quotas, counts the calls it admits, remembers the last
    arrival, throttles failure logs, and tells the observers of each call."""

    def __init__(
        self,
        max_concurrent_rpcs: int,
        observers: Sequence[CallObserver] = (),
        authenticator: Authenticator | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.in_flight = 0
        self._observers = tuple(observers)
        self._authenticator = authenticator
        self._limiter = limiter
        self._last_arrival = 0.0
        self._logs = ThrottledLog(log)

    def admitted(self, method: Method, full_name: str) -> Method:
        """`method` counted against the limit: over it, `Overloaded` before any work is done."""

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.in_flight >= self.max_concurrent_rpcs:
                self._logs.event(
                    "overload",
                    logging.WARNING,
                    "overloaded: refusing %s with %d calls running",
                    full_name,
                    self.in_flight,
                )
                raise Overloaded(self.max_concurrent_rpcs)
            self.in_flight += 1
            try:
                return await method(request, context)
            finally:
                self.in_flight -= 1

        return run

    def handler(
        self, method: Method, full_name: str, decode: Callable[[bytes], Message], policy: Policy
    ) -> Method:
        """`method` behind the decoding, error mapping and observers every call gets, and what `policy`
        asks for; takes the request's bytes, which `decode` turns into the request or raises DecodeError
        (binary protobuf for gRPC; JSON too over HTTP, server/http_gateway.py)."""
        service, name = full_name.strip("/").split("/")
        authenticator = self._authenticator if policy.authenticate else None
        limiter = self._limiter if policy.cost is not None else None
        cost = policy.cost

        async def run(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            self._last_arrival = time.monotonic()
            call = Call(service, name, context)
            CURRENT_CALL.set(call)  # the handler's own task: no reset needed
            for observer in self._observers:
                observer.started(call)
            try:
                if authenticator is not None:
                    call.caller = UNAUTHENTICATED
                    call.caller = authenticator.caller(context)
                try:
                    request = decode(raw)
                except DecodeError:
                    self._logs.event(
                        "undecodable",
                        logging.WARNING,
                        "undecodable %s request (%d bytes)",
                        full_name,
                        len(raw),
                    )
                    raise MalformedRequest(full_name, len(raw)) from None
                if limiter is not None and cost is not None:
                    limiter.take(call.caller, cost(request))
                response = await method(request, context)
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                call.code = grpc.StatusCode.CANCELLED
                self._finished(call)
                raise
            except Exception as exc:
                status = self._status(exc, call)
            else:
                self._finished(call)
                return response
            call.code = _CODES[status.code]
            self._finished(call)
            # Outside the except block: abort raises, and must not be caught as an unexpected failure.
            await _abort(context, bounded(status))

        return run

    def authenticated_stream(self, method: StreamMethod) -> StreamMethod:
        """A streaming `method` (reflection) behind the token check, when the server has tokens."""
        authenticator = self._authenticator

        async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if authenticator is not None:
                try:
                    authenticator.caller(context)
                except Unauthenticated as exc:
                    await _abort(context, bounded(status_of(exc)))
            async for response in method(requests, context):
                yield response

        return run

    def _finished(self, call: Call) -> None:
        for observer in reversed(self._observers):
            observer.finished(call)

    def _status(self, exc: Exception, call: Call) -> status_pb2.Status:
        """The status of what a call raised: its row of the error table, else INTERNAL with the call's
        request id, whose traceback only the server log sees."""
        if isinstance(exc, ServingError) and row_of(type(exc)) is not None:
            return status_of(exc)
        self._logs.event(
            f"internal:{call.service}/{call.method}:{type(exc).__name__}",
            logging.ERROR,
            "/%s/%s failed unexpectedly (request id %s)",
            call.service,
            call.method,
            call.request_id,
            exc_info=True,
        )
        return internal_status(call.request_id)

    async def quiesce(self, quiet_s: float, timeout_s: float) -> None:
        """Return once the loop has run for `quiet_s` without a call arriving (or after `timeout_s`): grpc
        hands the loop one received call per method per pass, so calls the server has received but not
        dispatched (while the loop was busy or held) wait until the loop gets round to them, and grpc's
        shutdown would cancel them. The window starts now at the earliest: an idle past proves nothing about
        calls that arrived while the loop could not run."""
        started = time.monotonic()
        deadline = started + timeout_s
        while (now := time.monotonic()) < deadline and now - max(self._last_arrival, started) < quiet_s:
            await asyncio.sleep(quiet_s / 10)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def _abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    grpc_status = rpc_status.to_status(status)
    await context.abort(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)


def register(
    server: grpc.aio.Server,
    service: descriptor.ServiceDescriptor,
    servicer: object,
    guard: CallGuard,
    policy: Policy,
) -> None:
    """Serve `servicer`'s unary-request methods of `service` through `guard`, as `policy` says. A
    unary-stream method writes its responses with `context.write`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client-streaming methods are not served through the guard")
        full_name = f"/{service.full_name}/{method.name}"
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behavior: Method = getattr(servicer, method.name)
        if policy.admit:
            behavior = guard.admitted(behavior, full_name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            guard.handler(behavior, full_name, request_type.FromString, policy),
            request_deserializer=None,  # bytes: decoding is the guard's, so bad bytes get a real status
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # As generated code does: registered methods skip grpc's per-call lookup (grpc-stubs predates them).
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
