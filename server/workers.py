"""Several server processes sharing one port, so every core serves: a supervisor starts and keeps the workers.

The supervisor is the control plane: it alone follows the registry, validates each version once and hands
the workers its scoring artifact, switching them together (server/control_plane.py). It claims the ports,
starts each worker as a fresh interpreter (`python -m streamflow.server.worker`, so a worker holds only what
scoring imports, not the control plane's MLflow and Feast), restarts workers that die and forwards
SIGTERM/SIGINT. Each worker builds its own gRPC server on the shared port with `grpc.so_reuseport` (the kernel
spreads new connections across the workers) and follows the model over its control channel.

The ports (the gRPC port, and the health and HTTP ports if any) are claimed for this server alone before the
workers share them: SO_REUSEPORT would otherwise let a second `streamflow serve` join a port and take half of
the new connections. A bind without SO_REUSEPORT fails on any socket already bound there, and a per-port lock
(an abstract Unix socket, scoped like the port to the network namespace) keeps two supervisors starting at the
same instant from both passing that probe. A program of the same user that binds with SO_REUSEPORT on its
own can still join: the kernel has no exclusive SO_REUSEPORT group.

A worker that dies while the server is not stopping (killed, crashed, or exited on its own, even with code 0)
is replaced after an exponential back-off, while the others keep the port served; the replacement binds the
port only once its model is loaded, so no new connection reaches a worker that cannot answer. A slot that dies
`CRASH_LIMIT` times within `CRASH_WINDOW_S` is broken rather than unlucky: the supervisor stops the others and
exits non-zero, so whatever runs the server sees it fail.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from streamflow.errors import StreamflowError
from streamflow.server import metrics
from streamflow.server.logs import event
from streamflow.settings import Settings

log = logging.getLogger(__name__)

WORKER_MODULE = "streamflow.server.worker"
"""What a worker runs: a fresh interpreter, so it holds only what scoring imports (server/worker.py)."""
SETTINGS_VARIABLE = "STREAMFLOW_WORKER_SETTINGS"
"""The environment variable handing a worker the supervisor's settings, as JSON."""


class ControlChannels(Protocol):
    """The control plane and its channels to the workers (server/control_plane.py)."""

    def start(self) -> None: ...

    def draining(self) -> None: ...

    def stop(self) -> None: ...

    def attach(self, slot: int) -> socket.socket: ...

    def detach(self, slot: int) -> None: ...


CRASH_LIMIT = 5
"""Deaths of one worker slot within `CRASH_WINDOW_S` that make the supervisor give up and exit non-zero."""
CRASH_WINDOW_S = 60.0
"""Window, in seconds, over which a slot's deaths count towards `CRASH_LIMIT`."""
RESTART_BACKOFF_S = 0.5
"""Delay before the first restart of a slot; it doubles with each further death within the window."""
RESTART_BACKOFF_MAX_S = 8.0
"""Longest delay before a restart."""

_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
"""What the supervisor waits for, blocked and taken synchronously with `sigtimedwait`: no handler races."""
_IDLE_WAIT_S = 1.0
"""Longest wait for a signal. A native thread that does not block the signals (the `streamflow` command
blocks them while it imports, so OpenBLAS's thread does; one a library starts later might not) can be handed
a process-wide signal: a SIGCHLD taken there is lost (its default is to ignore it), so every wake-up also
reaps, and a SIGTERM or SIGINT taken there runs `_received` (not the default, which would end the supervisor
without draining its workers), noticed here. Either is thus noticed within this long; seen in CI as a
supervisor that never reaped its workers."""
_PR_SET_PDEATHSIG = 1
_ANNOUNCE_CHECK_S = 0.05
"""How often the supervisor looks for its workers' bound ports until it has announced the address."""

_bound_fd: int | None = None
"""In a worker: the pipe it tells the supervisor on that its ports are bound (`announce_bound`)."""
METRICS_CHECK_S = 1.0
"""Seconds between two checks that the metrics endpoint's thread still runs (it is started again if not)."""


def worker_count(settings: Settings) -> int:
    """`settings.workers`, where 0 means one per CPU core available to this process."""
    if settings.workers:
        return settings.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def claimed_port(host: str, port: int) -> Iterator[int]:
    """Claim `port` (a free one when 0) for this server alone and hold it with SO_REUSEPORT for its workers.

    Raises StreamflowError (`cannot listen on HOST:PORT: ...`) when any socket is bound to the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as held:
        probe = held.enter_context(socket.socket(family, socket.SOCK_STREAM))
        # SO_REUSEADDR only skips connections of a previous server still in TIME_WAIT; without SO_REUSEPORT
        # the bind fails on every other socket bound to the port, listening or reserved.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(probe, host, port)
        port = int(probe.getsockname()[1])
        held.enter_context(_port_lock(host, port))
        probe.close()  # the workers' SO_REUSEPORT sockets cannot join a socket bound without it
        reserved = held.enter_context(socket.socket(family, socket.SOCK_STREAM))
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _bind(reserved, host, port)
        yield port


def _bind(sock: socket.socket, host: str, port: int) -> None:
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise StreamflowError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


@contextlib.contextmanager
def _port_lock(host: str, port: int) -> Iterator[None]:
    """Hold the lock of `port` among StreamFlow supervisors; released when the holder exits, even killed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lock:
        try:
            lock.bind(f"\0streamflow-serve-port-{port}")
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise StreamflowError(
                f"cannot listen on {host}:{port}: another streamflow server holds this port"
            ) from exc
        yield


@dataclass
class _Slot:
    """One worker position: its current process and its recent deaths."""

    number: int
    pid: int | None = None
    starts: int = 0
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


class _Supervisor:
    """Forks the workers, replaces those that die, stops them all on a signal or when one keeps dying."""

    def __init__(
        self,
        control: ControlChannels,
        settings: Settings,
        count: int,
        child_mask: set[int | signal.Signals],
        endpoint: metrics.MetricsEndpoint | None,
        inherited: tuple[int, ...],
    ):
        self._control = control
        self._inherited = inherited
        self._endpoint = endpoint
        self._settings = settings
        self._child_mask = child_mask
        self._slots = [_Slot(number) for number in range(1, count + 1)]
        self._stopping = False
        self._failed = False
        self._received_elsewhere: int | None = None
        # Each worker writes a byte once its ports are bound; the address is announced once all have.
        self._bound_read, self._bound_write = os.pipe()
        os.set_blocking(self._bound_read, False)
        os.set_inheritable(self._bound_write, True)
        self._bound = 0
        self._announcement: str | None = None

    def announce_when_bound(self, line: str) -> None:
        """Print `line` once every first worker has bound its ports: a caller that reads it and connects
        reaches a listening worker, and every worker shares the load from the first call."""
        self._announcement = line

    def start_all(self) -> None:
        for slot in self._slots:
            metrics.WORKER_RESTARTS.labels(str(slot.number))  # 0 from the first scrape, so rate() works
            self._start(slot)

    def run(self) -> int:
        """Supervise until every worker has exited after a stop; 0 when all of them exited cleanly."""
        while not self._stopping or any(slot.pid is not None for slot in self._slots):
            due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else _IDLE_WAIT_S
            if self._endpoint is not None:
                self._endpoint.check()
                timeout = min(timeout, METRICS_CHECK_S)
            if self._announcement is not None:
                self._announce_if_bound()
                timeout = min(timeout, _ANNOUNCE_CHECK_S)
            received = signal.sigtimedwait(_SIGNALS, timeout)
            signum = received.si_signo if received is not None else self._received_elsewhere
            self._received_elsewhere = None
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(f"{signal.Signals(signum).name} received")
            self._reap()
            self._restart_due()
        return 1 if self._failed else 0

    def received(self, signum: int, frame: object) -> None:
        """The handler of SIGTERM and SIGINT, for when another thread takes one (see `_IDLE_WAIT_S`)."""
        self._received_elsewhere = signum

    def _announce_if_bound(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._bound += len(os.read(self._bound_read, 1024))
        if self._bound >= len(self._slots) and self._announcement is not None:
            print(self._announcement, flush=True)
            self._announcement = None

    def _start(self, slot: _Slot) -> None:
        """Start the slot's worker: a fresh interpreter with the signal state of a new process, its control
        channel, the bound pipe and the `inherited` descriptors."""
        channel = self._control.attach(slot.number)
        replacement = slot.starts > 0
        argv = [
            sys.executable,
            "-m",
            WORKER_MODULE,
            f"--supervisor={os.getpid()}",
            f"--control-fd={channel.fileno()}",
            f"--bound-fd={self._bound_write}",
            *(f"--inherited-fd={fd}" for fd in self._inherited),
            *(["--replacement"] if replacement else []),
        ]
        environment = {**os.environ, SETTINGS_VARIABLE: self._settings.model_dump_json()}
        channel.set_inheritable(True)
        try:
            sys.stdout.flush()  # the worker writes to the same streams
            sys.stderr.flush()
            pid = os.posix_spawn(
                sys.executable,
                argv,
                environment,
                setsigmask=self._child_mask,
                setsigdef=tuple(_SIGNALS),
            )
        finally:
            channel.close()  # the worker's end; the control plane keeps its own
        slot.pid, slot.restart_at = pid, None
        slot.starts += 1

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)
                metrics.WORKER_RESTARTS.labels(str(slot.number)).inc()
                log.info(
                    "worker %d restarted as process %d",
                    slot.number,
                    slot.pid,
                    extra=event("worker_restarted", worker=slot.number, pid=slot.pid),
                )

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._slots if s.pid == pid), None)
            metrics.process_dead(pid)  # its live gauges go; its counters stay in the sums
            if slot is not None:
                slot.pid = None
                self._control.detach(slot.number)
                self._exited(slot, pid, os.waitstatus_to_exitcode(status))

    def _exited(self, slot: _Slot, pid: int, code: int) -> None:
        how = _describe_exit(code)
        if self._stopping:
            # A replacement still loading its model has no handler yet: the stop's SIGTERM ends it at once.
            if code not in (0, -signal.SIGTERM):
                self._failed = True
                log.warning(
                    "worker %d (process %d) %s while stopping",
                    slot.number,
                    pid,
                    how,
                    extra=event("worker_failed_stopping", worker=slot.number, pid=pid, exit=how),
                )
            return
        now = time.monotonic()
        slot.deaths.append(now)
        while slot.deaths[0] < now - CRASH_WINDOW_S:
            slot.deaths.popleft()
        if len(slot.deaths) >= CRASH_LIMIT:
            log.error(
                "worker %d died %d times within %.0f s (last: process %d %s); stopping the server",
                slot.number,
                len(slot.deaths),
                CRASH_WINDOW_S,
                pid,
                how,
                extra=event(
                    "worker_crash_loop", worker=slot.number, pid=pid, exit=how, deaths=len(slot.deaths)
                ),
            )
            self._failed = True
            self._stop(None)
            return
        delay = min(RESTART_BACKOFF_S * 2 ** (len(slot.deaths) - 1), RESTART_BACKOFF_MAX_S)
        slot.restart_at = now + delay
        log.warning(
            "worker %d (process %d) %s; restarting it in %.1f s "
            "(%d deaths within %.0f s, %d stop the server)",
            slot.number,
            pid,
            how,
            delay,
            len(slot.deaths),
            CRASH_WINDOW_S,
            CRASH_LIMIT,
            extra=event("worker_died", worker=slot.number, pid=pid, exit=how, restart_in_s=delay),
        )

    def _stop(self, why: str | None) -> None:
        """Stop every worker (each drains its calls); restarts still pending are dropped."""
        if why is not None:
            running = sum(slot.pid is not None for slot in self._slots)
            log.info(
                "%s, stopping %d workers", why, running, extra=event("workers_stopping", workers=running)
            )
        self._stopping = True
        self._control.draining()
        for slot in self._slots:
            slot.restart_at = None
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)


def run_workers(
    settings: Settings,
    count: int,
    control: ControlChannels,
    endpoint: metrics.MetricsEndpoint | None = None,
    inherited: tuple[int, ...] = (),
) -> int:
    """Start `count` workers on `settings.port` and keep them running until SIGTERM/SIGINT; 0 on a clean stop.
    The supervisor runs `control` and serves `endpoint` (every worker's metrics) meanwhile, both started after
    the signals are blocked so their threads never take one. Each worker inherits the `inherited` descriptors.

    Raises StreamflowError when the port (or the health port) is taken.
    """
    with contextlib.ExitStack() as claims:
        port = claims.enter_context(claimed_port(settings.listen_host, settings.port))
        if (
            settings.health_port
        ):  # answered by the supervisor itself (server/control_plane.py), off the workers
            claims.enter_context(claimed_port(settings.listen_host, settings.health_port))
        if settings.http_port:  # and the HTTP port
            claims.enter_context(claimed_port(settings.listen_host, settings.http_port))
        worker_settings = settings.model_copy(update={"port": port, "health_port": 0})
        _note_connection_migration()
        # Blocked before the first worker starts, so no death or signal can slip in between; workers start
        # with the mask of before.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            control.start()
            claims.callback(control.stop)
            for fd in inherited:
                os.set_inheritable(fd, True)
            supervisor = _Supervisor(control, worker_settings, count, mask, endpoint, inherited)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, supervisor.received)
            supervisor.start_all()
            address = f"{settings.listen_host}:{port}"
            supervisor.announce_when_bound(f"streamflow serve: listening on {address} with {count} workers")
            return supervisor.run()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def announce_bound() -> None:
    """In a worker, once its ports are bound: tell the supervisor (a no-op anywhere else)."""
    if _bound_fd is not None:
        os.write(_bound_fd, b"1")


def _note_connection_migration() -> None:
    """Say once when the kernel resets, instead of handing to another worker, the connections a dying worker
    had not yet accepted (Linux 5.14+ migrates them when net.ipv4.tcp_migrate_req is 1)."""
    with contextlib.suppress(OSError):
        if Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "0":
            log.info(
                "net.ipv4.tcp_migrate_req is 0: connections a dying worker has not accepted yet are reset, "
                "not handed to another worker"
            )


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def worker_process(supervisor: int, bound_fd: int, serve: Callable[[], int]) -> int:
    """A worker's whole life: tied to its supervisor, then `serve()`; returns the exit code."""
    global _bound_fd
    _bound_fd = bound_fd
    _drain_when_orphaned(supervisor)
    try:
        return serve()
    except StreamflowError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        log.exception("worker process %d failed", os.getpid())
        return 1


def _drain_when_orphaned(supervisor: int) -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies, even killed: none runs unsupervised."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("worker process %d will outlive a killed supervisor: prctl failed", os.getpid())
        return
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
