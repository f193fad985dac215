"""Several server processes sharing one port, so every core serves: a supervisor forks the workers.

gRPC objects must not exist before a fork (grpc `examples/python/multiprocessing`), so the supervisor creates
none: it only reserves the port, forks, forwards SIGTERM/SIGINT and waits. Each worker then builds its own
server on the shared port with `grpc.so_reuseport` (the kernel spreads new connections across the workers) and
its own registry watcher, so each follows the registry on its own and swaps models independently.

If a worker dies on its own, the supervisor stops the others and exits non-zero: a half-strength server should
be restarted by whatever runs it, not limp along.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from types import FrameType

from streamflow.errors import StreamflowError
from streamflow.settings import Settings

log = logging.getLogger(__name__)

Worker = Callable[[Settings], int]
"""Runs one server process on `settings.port` (port sharing on) until SIGTERM; returns its exit code."""


def worker_count(settings: Settings) -> int:
    """`settings.workers`, where 0 means one per CPU core available to this process."""
    if settings.workers:
        return settings.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """Hold `port` (a free one when 0) with SO_REUSEPORT, so workers can bind it and no one else takes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StreamflowError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        yield int(sock.getsockname()[1])


def run_workers(settings: Settings, count: int, worker: Worker) -> int:
    """Fork `count` workers on `settings.port`, supervise them until SIGTERM/SIGINT; 0 on a clean stop."""
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        log.info("%s received, stopping %d workers", signal.Signals(signum).name, count)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    pids: set[int] = set()
    with reserved_port(settings.host, settings.port) as port:
        worker_settings = settings.model_copy(update={"port": port})
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        # Anything still buffered would be written again by every child that flushes its inherited copy.
        sys.stdout.flush()
        sys.stderr.flush()
        for _ in range(count):
            pid = os.fork()
            if pid == 0:
                os._exit(_run_child(worker, worker_settings))
            pids.add(pid)
        print(f"streamflow serve: listening on {settings.host}:{port} with {count} workers", flush=True)
        failed = False
        while pids:
            pid, status = os.wait()
            pids.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if not stopping:
                log.error("worker %d exited with %d; stopping the others", pid, code)
                failed = True
                on_signal(signal.SIGTERM, None)
            failed = failed or code != 0
    return 1 if failed else 0


def _run_child(worker: Worker, settings: Settings) -> int:
    """A worker's whole life: default signal handling (the worker installs its own), then serve."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    try:
        return worker(settings)
    except StreamflowError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        log.exception("worker %d failed", os.getpid())
        return 1
