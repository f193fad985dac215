"""The PredictionService over HTTP on `settings.http_port`: the Connect protocol (unary JSON or binary
protobuf over HTTP/1.1 or HTTP/2, TLS or not), gRPC-Web for browsers, and gRPC itself.

The `connectrpc` library speaks the protocols; Hypercorn serves it as ASGI on the gRPC server's own event
loop, so both ports share one servicer, one batcher and one call guard. Its endpoints are made from the
service's descriptor (as `server/rpc.py` registers the gRPC methods), so no generated code can go stale.

Every HTTP call passes through the gRPC calls' `CallGuard`: the codecs here leave the request's bytes
undecoded and only note their format, and the guard decodes them (bad JSON or bytes are INVALID_ARGUMENT
`MALFORMED_REQUEST`, after the token check as over gRPC), names the caller from `Authorization: Bearer`,
takes quotas, admits, maps errors with the one error table and tells the metrics, access log and tracing.
`HttpContext` gives the guard what it asks of a grpc context; its `abort` raises the status as a
`ConnectError` carrying the same details, which the Connect error JSON shows as base64 and as `debug` JSON.

JSON requests follow protobuf's JSON mapping: `userId` and `user_id` are both accepted; a field the
message does not have is MALFORMED_REQUEST rather than silently ignored (a misspelt `userid` would
otherwise score the empty id).

TLS: with `settings.tls_on` the port serves HTTPS with the gRPC port's files, re-read on change for new
connections (the handshake swaps in a context made from a rotated, validated set). Client certificates
are required and verified under mTLS, but only a token names an HTTP caller: without tokens every HTTP
caller is `anonymous` (Hypercorn does not hand the peer certificate to the application).

Supervision: the serving task is watched; if it ends while the server is not stopping, the outage is
logged once and the port bound and served again after a back-off; the recovery is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import descriptor, descriptor_pb2, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from protobuf import Registry
from protobuf._codegen import file_desc  # what protobuf-py's generated modules call
from protobuf.wkt import Any as AnyDetail
from protobuf.wkt.google.protobuf import duration_pb

from streamflow.errors import StreamflowError
from streamflow.server import tls
from streamflow.server.logs import event
from streamflow.server.rpc import CallGuard, Method, Policy
from streamflow.settings import Settings

log = logging.getLogger(__name__)
# Hypercorn announces each start with "Running on ... (CTRL + C to quit)"; `HttpGateway.start` names the port.
logging.getLogger("hypercorn.error").setLevel(logging.WARNING)

RESTART_BACKOFF_S = 0.5
"""Delay before the serving task is started again after it ended unexpectedly; doubles per failure..."""
RESTART_BACKOFF_MAX_S = 8.0
"""...up to this."""

_CODES = {code: Code[code.name.replace("CANCELLED", "CANCELED")] for code in grpc.StatusCode if code.value[0]}
_TYPE_URL = "type.googleapis.com/"


@dataclass(frozen=True, slots=True)
class Undecoded:
    """A request body as the library hands it over: its bytes and whether they are JSON."""

    data: bytes
    json: bool


class PassThroughCodec:
    """A Connect codec that leaves decoding to the call guard and encodes responses with google.protobuf."""

    def __init__(self, name: str, json: bool) -> None:
        self._name = name
        self._json = json

    def name(self) -> str:
        return self._name

    def encode(self, message: Message) -> bytes:
        if self._json:
            return json_format.MessageToJson(message, indent=None).encode()
        return message.SerializeToString()

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Undecoded:
        return Undecoded(bytes(data), self._json)


def json_decoder(message_class: type[Message]) -> Callable[[bytes], Message]:
    """Parse a JSON body into `message_class`, raising DecodeError (the guard's MALFORMED_REQUEST) when it is
    not the message's JSON: not a JSON object, not UTF-8, a field it does not have, a value of the wrong
    type."""

    def decode(data: bytes) -> Message:
        if not data.lstrip().startswith(b"{"):  # json_format takes `[]` for an empty message
            raise DecodeError("not a JSON object")
        try:
            return json_format.Parse(data.decode(), message_class())
        except (json_format.ParseError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8
            raise DecodeError(type(exc).__name__) from None

    return decode


class HttpContext:
    """What the call guard, the authenticator, the access log and tracing ask of a grpc context, answered
    from an HTTP request."""

    def __init__(self, request: RequestContext[Any, Any]) -> None:
        self._request = request

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request headers, names lower-cased as gRPC metadata keys are."""
        return tuple((key.lower(), value) for key, value in self._request.request_headers.allitems())

    def auth_context(self) -> dict[str, list[bytes]]:
        """No TLS peer identity reaches the application (see the module docstring)."""
        return {}

    def peer(self) -> str:
        """The client's address in grpc's form, e.g. `ipv4:127.0.0.1:50312`."""
        address = self._request.client_address or "unknown"
        if address.count(":") > 1:
            host, _, port = address.rpartition(":")
            return f"ipv6:[{host}]:{port}"
        return f"ipv4:{address}"

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> NoReturn:
        """Raise the call's status (the guard sends it as `grpc-status-details-bin`) as a ConnectError;
        a RetryInfo delay also becomes a `Retry-After` header."""
        raw = dict(trailing_metadata).get("grpc-status-details-bin")
        status = status_pb2.Status.FromString(raw) if raw else status_pb2.Status(message=details)
        for detail in status.details:
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                seconds = retry.retry_delay.ToNanoseconds() / 1e9
                self._request.response_headers["retry-after"] = str(max(1, math.ceil(seconds)))
        raise ConnectError(_CODES[code], status.message, [_detail(any_) for any_ in status.details])


def _detail_registry() -> Registry:
    """The google.rpc error details as protobuf-py (the library's own runtime) knows them, so that the error
    JSON carries each detail's `debug` JSON beside its base64 bytes."""
    proto = descriptor_pb2.FileDescriptorProto()
    error_details_pb2.DESCRIPTOR.CopyToProto(proto)

    def name_fields(messages: Any, descriptors: Mapping[str, descriptor.Descriptor]) -> None:
        # CopyToProto leaves out the JSON names protoc fills in, which protobuf-py's JSON needs.
        for message in messages:
            known = descriptors[message.name]
            for field in message.field:
                field.json_name = known.fields_by_name[field.name].json_name
            name_fields(message.nested_type, known.nested_types_by_name)

    name_fields(proto.message_type, error_details_pb2.DESCRIPTOR.message_types_by_name)
    return Registry(file_desc(proto.SerializeToString(), [duration_pb.desc()], {}))


_DETAILS = _detail_registry()


def _detail(packed: Any) -> ErrorDetail:
    """A status detail for the library: decoded when it is a google.rpc detail, so it shows as `debug`."""
    wrapped = AnyDetail(type_url=packed.type_url, value=packed.value)
    known = _DETAILS.message(packed.type_url.removeprefix(_TYPE_URL))
    message = wrapped.unpack(known) if known is not None else None
    return ErrorDetail(message if message is not None else wrapped)


class PredictionApp(ConnectASGIApplication[None]):
    """The ASGI application of one service: each of its unary methods, through the call guard."""

    def __init__(
        self, service: descriptor.ServiceDescriptor, servicer: object, guard: CallGuard, policy: Policy
    ) -> None:
        endpoints = {
            f"/{service.full_name}/{method.name}": Endpoint.unary(
                _method_info(service, method), _guarded(service, method, servicer, guard, policy)
            )
            for method in service.methods
        }
        self._path = f"/{service.full_name}"
        super().__init__(
            service=None,
            endpoints=lambda _: endpoints,
            codecs=[PassThroughCodec("proto", json=False), PassThroughCodec("json", json=True)],
        )

    @property
    def path(self) -> str:
        return self._path


def _method_info(
    service: descriptor.ServiceDescriptor, method: descriptor.MethodDescriptor
) -> MethodInfo[Any, Any]:
    if method.client_streaming or method.server_streaming:
        raise ValueError(f"{method.full_name}: only unary methods are served over HTTP")
    return MethodInfo(
        name=method.name,
        service_name=service.full_name,
        input=message_factory.GetMessageClass(method.input_type),
        output=message_factory.GetMessageClass(method.output_type),
        idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=StreamType.UNARY,
    )


def _guarded(
    service: descriptor.ServiceDescriptor,
    method: descriptor.MethodDescriptor,
    servicer: object,
    guard: CallGuard,
    policy: Policy,
) -> Callable[[Undecoded, RequestContext[Any, Any]], Awaitable[Message]]:
    """`servicer`'s `method` behind the call guard, as the library calls it."""
    full_name = f"/{service.full_name}/{method.name}"
    request_type = message_factory.GetMessageClass(method.input_type)
    behavior: Method = getattr(servicer, method.name)
    if policy.admit:
        behavior = guard.admitted(behavior, full_name)
    # One guarded handler per body format: the guard decodes, so a bad body is its MALFORMED_REQUEST.
    binary = guard.handler(behavior, full_name, request_type.FromString, policy)
    text = guard.handler(behavior, full_name, json_decoder(request_type), policy)

    async def call(request: Undecoded, context: RequestContext[Any, Any]) -> Message:
        handler = text if request.json else binary
        # The guard and its observers use only what HttpContext answers of a grpc context.
        response = await handler(request.data, cast(grpc.aio.ServicerContext, HttpContext(context)))
        return cast(Message, response)

    return call


class SizedResponses:
    """An ASGI wrapper that gives a response sent as one body message a `content-length`, so HTTP/1.1
    clients get it without chunked framing (the library leaves the length out; h2load counted every chunked
    answer as failed). Streamed responses (gRPC-Web) and responses with trailers pass unchanged."""

    def __init__(self, app: PredictionApp) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        held: dict[str, Any] | None = None

        async def sized(message: dict[str, Any]) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and not message.get("trailers"):
                held = message  # until the first body message says whether it is the whole body
                return
            if held is not None:
                start, held = held, None
                if not message.get("more_body") and all(
                    k.lower() != b"content-length" for k, _ in start["headers"]
                ):
                    length = str(len(message.get("body", b""))).encode()
                    start = {**start, "headers": [*start["headers"], (b"content-length", length)]}
                await send(start)
            await send(message)

        await self._app(scope, receive, sized)


class _Config(Config):
    """Hypercorn's settings with our own TLS context (Hypercorn's would read the files once, at start)."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return self._context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


class RotatingTls:
    """The HTTPS context, swapped at a handshake for one made from the set in force once the process's
    certificate reloader (shared with the gRPC port, which also logs rotations and refusals) has taken a new
    one. The context is built from the validated bytes, never from the files again, which may have changed."""

    def __init__(self, reloader: tls.CertificateReloader) -> None:
        self._reloader = reloader
        self._applied = reloader.served
        self._current = self._context(self._applied)
        self.initial = self._current

    def _context(self, served: tls.CertificateSet) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2", "http/1.1"])
        # `load_cert_chain` reads files only: the set's own bytes, in a private folder for the instant.
        with tempfile.TemporaryDirectory(prefix="streamflow-tls-") as folder:
            pair = Path(folder) / "pair.pem"
            pair.write_bytes(served.chain_pem + b"\n" + served.key_pem)
            context.load_cert_chain(pair)
        if served.client_ca_pem is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=served.client_ca_pem.decode())
        context.sni_callback = self._on_handshake
        return context

    def _on_handshake(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        served = self._reloader.current()
        if served is not self._applied:
            self._applied, self._current = served, self._context(served)
        if connection.context is not self._current:
            connection.context = self._current


class HttpGateway:
    """Serves `app` on `host:port` with Hypercorn on the running loop, restarting it if it ends while not
    stopping."""

    def __init__(self, app: PredictionApp, host: str, port: int, reuse_port: bool, tls_context: Any) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._config = _Config(tls_context)
        self._config.errorlog = logging.getLogger("hypercorn.error")
        self._config.accesslog = None  # the call guard's access log covers every call
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._socket = self._bind()

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        app: PredictionApp,
        reuse_port: bool,
        certificates: tls.CertificateReloader | None,
    ) -> HttpGateway:
        """The gateway on `settings.http_port` (bound, not yet serving; the caller checks the port is on);
        HTTPS with `certificates` (the gRPC port's) when given. Raises StreamflowError when the port cannot be
        bound."""
        context = RotatingTls(certificates).initial if certificates is not None else None
        return cls(app, settings.listen_host, settings.http_port, reuse_port, context)

    @property
    def scheme(self) -> str:
        return "https" if self._config.ssl_enabled else "http"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio turns Nagle off only on sockets that say so (accepted ones inherit
        # it), and with Nagle on a response's second write waited for the client's delayed ACK (40 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:  # the workers share the port the supervisor claimed (server/workers.py)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._host, self._port))
            sock.listen(self._config.backlog)
        except OSError as exc:
            sock.close()
            raise StreamflowError(f"cannot listen on {self._host}:{self._port}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        """Start serving on the running loop."""
        sockets = (
            Sockets([self._socket], [], []) if self._config.ssl_enabled else Sockets([], [self._socket], [])
        )
        self._task = asyncio.get_running_loop().create_task(
            worker_serve(
                ASGIWrapper(SizedResponses(self._app)),
                self._config,
                sockets=sockets,
                shutdown_trigger=self._stopping.wait,
            ),
            name="http-gateway",
        )
        self._task.add_done_callback(self._ended)
        log.info("HTTP (Connect, gRPC-Web) on %s://%s:%d", self.scheme, self._host, self._port)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping.is_set():
            return
        self._failures += 1
        delay = min(RESTART_BACKOFF_S * 2 ** (self._failures - 1), RESTART_BACKOFF_MAX_S)
        if self._failures == 1:  # once per outage: a restart that fails again is the same outage
            error = None if task.cancelled() else task.exception()
            log.error(
                "HTTP server on port %d stopped unexpectedly (%s); serving it again in %.1f s",
                self._port,
                "cancelled" if task.cancelled() else repr(error),
                delay,
                exc_info=error,
                extra=event("http_server_failed", port=self._port, restart_in_s=delay),
            )
        asyncio.get_running_loop().call_later(delay, self._restart)

    def _restart(self) -> None:
        if self._stopping.is_set():
            return
        try:
            self._socket = self._bind()
        except StreamflowError:
            self._ended(cast(asyncio.Task[None], self._task))  # the port is not back yet: try again later
            return
        self.start()
        log.info(
            "HTTP server on port %d serving again after %d failed start(s)",
            self._port,
            self._failures,
            extra=event("http_server_recovered", port=self._port),
        )
        self._failures = 0

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, give requests in flight `grace` s (None: none), then close what is left."""
        self._config.graceful_timeout = grace or 0.0
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])  # a task that failed has been reported by `_ended`
        self._socket.close()
