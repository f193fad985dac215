"""Builds and runs the gRPC server: PredictionService, health, reflection, and the registry watcher.

The server is grpc's asyncio server on an event loop of its own thread. grpc's sync server handed each call
to a thread pool whose threads then queued for the GIL at every hand-off and every GIL release (SQLite,
ONNX), so one worker answered fewer Predicts/s at concurrency 8 than at 1. Here Predicts are scored in
coalesced batches on the loop itself while scoring is fast, which costs less than a hand-off to a thread, and
on a thread of their own while it is slow (server/batcher.py); BatchPredicts run on a small pool
(`settings.threads`), so health checks and ModelInfo keep answering while 1,000-user batches run.

`create_server` starts a server (port 0 picks a free port, as tests do) and returns a handle that stops the
server, its health and its watcher together; `serve` runs one until SIGTERM or SIGINT, draining calls in
flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import select
import signal
import threading
from collections.abc import Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

from streamflow.errors import StreamflowError
from streamflow.server import metrics, tls, tracing
from streamflow.server.auth import Authenticator
from streamflow.server.health import SERVING, HealthService
from streamflow.server.heap import limit_malloc_arenas
from streamflow.server.loaded_model import LoadedModel
from streamflow.server.observers import call_observers
from streamflow.server.prediction_log import PredictionLog
from streamflow.server.predictor import Predictor
from streamflow.server.quotas import RateLimiter, SharedBuckets
from streamflow.server.reflection import register_reflection
from streamflow.server.rpc import CallGuard, Policy, register
from streamflow.server.servicer import PredictionServicer, users_requested
from streamflow.server.workers import METRICS_CHECK_S, announce_bound, run_workers, worker_count
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings

if TYPE_CHECKING:
    from streamflow.server.http_gateway import HttpGateway

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
"""`streamflow.serving.v1.PredictionService`, the name health and reflection report."""
HEALTH_SERVICES = ("", SERVICE_NAME)
"""Health names the server reports: the whole server and the prediction service."""

DISPATCH_QUIET_S = 0.2
"""A drain waits until no call has arrived for this long before grpc's shutdown, so every call the server
received has reached its handler (grpc cancels received calls it has not yet dispatched)..."""
DISPATCH_WAIT_MAX_S = 2.0
"""...but no longer than this: new connections keep arriving while the server still listens (the kernel hands
a draining worker its share of a shared port), and a steady stream of them must not hold the drain for the
whole grace."""

MAX_PENDING_CALLS = 50_000
"""Calls grpc core may hold received but not yet taken by the event loop before it refuses more (below)."""
FLOOD_OPTIONS = (
    # grpc core keeps the calls it received but the loop has not yet taken (one per method per loop pass)
    # in a pending queue, and past 1,000 of them (3,000 hard) it drops calls at random with CANCELLED before
    # the guard ever sees them. Raised, so that an excess is the guard's retryable RESOURCE_EXHAUSTED.
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
)

T = TypeVar("T")


class EventLoopThread:
    """An asyncio event loop running in a thread of its own, so callers (serve, tests) stay synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result (or exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        """Cancel what is left on the loop, stop it and join its thread."""
        self.run(_cancel_remaining_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_remaining_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class PredictionServer:
    """A started server and what must stop with it."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    health: HealthService
    guard: CallGuard
    predictor: Predictor
    event_loop: EventLoopThread
    pools: tuple[futures.ThreadPoolExecutor, ...]
    health_server: grpc.aio.Server | None = None
    """The plaintext health-only server on `settings.health_port`, if any."""
    http: HttpGateway | None = None
    """The PredictionService over HTTP (Connect, gRPC-Web) on `settings.http_port`, if any."""
    prediction_log: PredictionLog | None = None
    """Where served predictions go (server/prediction_log.py); closed, so flushed, after the last call."""
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def local_address(self) -> str:
        """Where a client on this machine dials the server, e.g. `127.0.0.1:50051`."""
        host = "[::1]" if ":" in self.settings.listen_host else "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float | None) -> None:
        """Drain and stop, once: report NOT_SERVING (ending health watches), keep accepting calls for
        `settings.drain_delay_s` so load balancers notice, let every call received so far reach its handler,
        then refuse new calls and give those in flight `grace` s (None: cancel them now); stop the watcher."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.event_loop.run(self._stop(grace))
        # The watcher may still announce a model on the loop until it stops; health ignores it by now.
        self.predictor.watcher.stop()
        if self.predictor.shadow is not None:  # every call has answered: it scores what was queued, no more
            self.predictor.shadow.stop()
        self.event_loop.close()
        for pool in self.pools:
            pool.shutdown(wait=True)
        if self.prediction_log is not None:  # every call has answered: nothing more can be logged
            self.prediction_log.close()

    async def _stop(self, grace: float | None) -> None:
        self.health.start_drain()
        if grace is not None:
            await asyncio.sleep(self.settings.drain_delay_s)
            await self.guard.quiesce(DISPATCH_QUIET_S, timeout_s=min(grace, DISPATCH_WAIT_MAX_S))
        servers = (self.server,) if self.health_server is None else (self.server, self.health_server)
        http_stop = () if self.http is None else (self.http.stop(grace),)
        await asyncio.gather(*(server.stop(grace) for server in servers), *http_stop)


def create_server(
    settings: Settings,
    predictor: Predictor | None = None,
    reuse_port: bool = False,
    buckets: SharedBuckets | None = None,
    prediction_log: PredictionLog | None = None,
) -> PredictionServer:
    """Start a server on `settings.listen_host:settings.port` and its registry watcher.

    Health reports NOT_SERVING until the watcher has loaded a model. `reuse_port` lets several workers
    share the port; off, a port in use is an error. `buckets` holds the callers' quotas, shared with the
    other workers (a server of its own otherwise). Each prediction served goes to `prediction_log`, if any,
    which the server closes when it stops. Raises StreamflowError when the port cannot be bound or
    the tokens file cannot be read.
    """
    authenticator = Authenticator.from_settings(
        settings.auth_tokens_file, client_certificates=settings.tls_client_ca_file is not None
    )
    limiter = None
    if settings.rate_limit_rps:
        limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst, buckets or SharedBuckets())
    if predictor is None:
        # A server of its own follows the registry itself. Imported here: a scoring worker, which gets its
        # predictor from the control plane, never imports MLflow and Feast.
        from streamflow.server.model_watcher import ModelWatcher
        from streamflow.server.shadow_evidence import single_process_shadow

        watcher = ModelWatcher(settings)
        predictor = Predictor(settings, watcher, single_process_shadow(settings, watcher))
    event_loop = EventLoopThread()
    batch_pool = futures.ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="batch")
    predict_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
    servicer = PredictionServicer(
        predictor, predict_pool, batch_pool, settings.max_batch_size, prediction_log
    )
    guard = CallGuard(settings.max_concurrent_rpcs, call_observers(settings), authenticator, limiter)
    try:
        server, port, health_service, health_server, http = event_loop.run(
            _start(settings, servicer, guard, reuse_port)
        )
    except BaseException:
        event_loop.close()
        batch_pool.shutdown()
        predict_pool.shutdown()
        raise

    def serving(model: LoadedModel) -> None:  # called on the watcher's thread
        event_loop.loop.call_soon_threadsafe(health_service.set, SERVING)

    predictor.watcher.subscribe(serving)
    predictor.watcher.start()
    if predictor.shadow is not None:
        predictor.shadow.start()
    log.info("listening on %s:%d for %s", settings.listen_host, port, settings.model_uri)
    return PredictionServer(
        settings,
        server,
        port,
        health_service,
        guard,
        predictor,
        event_loop,
        (predict_pool, batch_pool),
        health_server,
        http,
        prediction_log,
    )


async def _start(
    settings: Settings, servicer: PredictionServicer, guard: CallGuard, reuse_port: bool
) -> tuple[grpc.aio.Server, int, HealthService, grpc.aio.Server | None, HttpGateway | None]:
    # First: bad TLS files fail before anything binds. One reloader serves both ports' handshakes.
    certificates = tls.certificates(settings)
    credentials = tls.server_credentials(certificates)
    # No `maximum_concurrent_rpcs`: it counted health checks too, so probes failed under a flood; the guard
    # admits PredictionService calls only (server/rpc.py).
    server = grpc.aio.server(
        options=[
            # grpc turns SO_REUSEPORT on by default, so a second server would silently share the port.
            ("grpc.so_reuseport", int(reuse_port)),
            *FLOOD_OPTIONS,
        ],
    )
    predictions = Policy(admit=True, authenticate=True, cost=users_requested)
    register(server, pb.DESCRIPTOR.services_by_name["PredictionService"], servicer, guard, predictions)
    health_service = HealthService(HEALTH_SERVICES)
    serve_health(server, health_service, guard)
    if settings.reflection_on:
        register_reflection(server, (SERVICE_NAME, health.SERVICE_NAME), guard)
    port = bind(server, settings.listen_host, settings.port, credentials)
    health_server = None
    if settings.health_port:
        health_server = health_only_server(health_service, guard, reuse_port)
        bind(health_server, settings.listen_host, settings.health_port, None)
    # The same servicer, guard and policy over HTTP, on this loop.
    service = pb.DESCRIPTOR.services_by_name["PredictionService"]
    http: HttpGateway | None = None
    if settings.http_port:
        # Imported only to serve it: the Connect and Hypercorn stack is 10 MB of a worker's memory.
        from streamflow.server.http_gateway import HttpGateway, PredictionApp

        http = HttpGateway.for_settings(
            settings, PredictionApp(service, servicer, guard, predictions), reuse_port, certificates
        )
    for started in (server,) if health_server is None else (server, health_server):
        await started.start()
    if http is not None:
        http.start()
    if settings.health_port:
        log.info("health alone, plaintext, on %s:%d", settings.listen_host, settings.health_port)
    return server, port, health_service, health_server, http


def serve_health(server: grpc.aio.Server, service: HealthService, guard: CallGuard) -> None:
    """Answer `grpc.health.v1` on `server`: never authenticated nor admitted, so probes always get through."""
    register(server, health_pb2.DESCRIPTOR.services_by_name["Health"], service, guard, Policy())


def health_only_server(service: HealthService, guard: CallGuard, reuse_port: bool) -> grpc.aio.Server:
    """A server answering health alone, for probes that cannot speak TLS or send a token (Kubernetes gRPC
    probes): plaintext, on `settings.health_port`, on the calling event loop."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    serve_health(server, service, guard)
    return server


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Add the listening port (TLS with `credentials`, else plaintext); returns the port bound."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio 1.85 raises where older releases returned port 0; both mean it failed
        bound = 0
    if bound == 0:
        raise StreamflowError(f"cannot listen on {address}: the port is in use or the address is not local")
    return bound


def bound_registry_calls(settings: Settings) -> None:
    """Keep a slow or absent MLflow server from stalling the watcher for minutes (MLflow's defaults: 120 s
    timeout, 7 retries). Process-wide, so only `serve` sets them; an operator's own values win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(settings.registry_timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    # A progress bar per model download is noise in a server log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then drain calls in flight for up to `settings.grace_s`; returns 0.

    With several workers (`settings.workers`, 0 = one per core) a supervisor starts them and is their control
    plane: it alone follows the registry and hands each version to every worker (server/control_plane.py).
    """
    bound_registry_calls(settings)
    limit_malloc_arenas()  # before any thread exists; forked workers inherit it
    workers = worker_count(settings)
    with contextlib.ExitStack() as stack:
        endpoint = None
        if settings.metrics_port:
            # Before the fork: every worker writes its samples there.
            path = stack.enter_context(metrics.multiprocess_dir())
            endpoint = metrics.MetricsEndpoint(settings.listen_host, settings.metrics_port, path)
            stack.callback(endpoint.close)
        # Before the fork: every worker takes the callers' quotas from the same buckets.
        buckets = SharedBuckets() if settings.rate_limit_rps else None
        if workers > 1:
            from streamflow.server.control_plane import (
                ControlPlane,
            )  # the supervisor's alone, like its imports
            from streamflow.server.model_watcher import ModelWatcher
            from streamflow.server.shadow_evidence import shadow_watcher

            Authenticator.from_settings(
                settings.auth_tokens_file, False
            )  # a bad tokens file: one clear error
            tls.check(settings)  # likewise unusable TLS files
            watcher = ModelWatcher(settings, serving=False)  # and a malformed model URI, served or shadow
            control = ControlPlane(settings, watcher, shadow_watcher(settings, watcher))
            inherited = () if buckets is None else (buckets.fileno(),)
            if settings.prediction_log:
                # The supervisor writes the log; workers send it their records (server/prediction_sink.py).
                from streamflow.server.prediction_sink import Collector

                collector = Collector(settings)
                collector.start()
                stack.callback(collector.close)  # after the workers exited: reads what they sent
                inherited = (*inherited, collector.worker_fd)
            return run_workers(settings, workers, control, endpoint, inherited)
        prediction_log = None
        if settings.prediction_log:
            from streamflow.server.prediction_sink import in_process_log

            prediction_log = in_process_log(settings)
        return serve_process(
            settings, reuse_port=False, endpoint=endpoint, buckets=buckets, prediction_log=prediction_log
        )


def serve_process(
    settings: Settings,
    reuse_port: bool,
    predictor: Predictor | None = None,
    endpoint: metrics.MetricsEndpoint | None = None,
    buckets: SharedBuckets | None = None,
    prediction_log: PredictionLog | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; `endpoint` (one worker only) is kept serving meanwhile."""
    # The handler takes no lock and logs nothing, it only wakes the main thread through a pipe: a handler
    # that called Event.set ran, on a second SIGTERM (a worker often gets its process group's and its
    # supervisor's at once), inside the first's Event.set, blocked on the lock that one held, and the worker
    # never stopped; a wait with a timeout held that lock each time it woke, so one signal could do the same.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        # A full pipe already wakes the main thread; a closed one (a signal after the stop) wakes nobody.
        with contextlib.suppress(OSError):
            os.write(wake_write, b"\0")

    def stop_requested(timeout_s: float | None) -> bool:
        return bool(select.select([wake_read], [], [], timeout_s)[0])

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    running = create_server(
        settings, predictor, reuse_port=reuse_port, buckets=buckets, prediction_log=prediction_log
    )
    if reuse_port:
        log.info("worker %d listening on %s:%d", os.getpid(), settings.listen_host, running.port)
        announce_bound()
    else:
        print(f"streamflow serve: listening on {settings.listen_host}:{running.port}", flush=True)
    if endpoint is None:
        stop_requested(None)  # select without a timeout returns only once the pipe is readable
    else:
        endpoint.check()
        while not stop_requested(METRICS_CHECK_S):
            endpoint.check()
    log.info("%s received, draining for up to %.0f s", signal.Signals(received[0]).name, settings.grace_s)
    running.stop(settings.grace_s)
    tracing.shutdown()  # flush the spans still batched: a worker's exit skips atexit
    for fd in (wake_read, wake_write):
        os.close(fd)
    log.info("stopped")
    return 0
