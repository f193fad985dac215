"""Starts, probes, measures and stops the services the benchmark compares, each in its own process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

from streamflow.healthcheck import check

BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """A running service under test."""

    name: str
    port: int
    process: subprocess.Popen[bytes]

    def memory_mb(self) -> tuple[float, float]:
        """(proportional set size of the process and its children, largest single-process RSS), in MB.

        PSS, not summed RSS, for the total: forked workers share their parent's pages copy-on-write, and PSS
        counts a shared page once across the processes that share it.
        """
        parent = psutil.Process(self.process.pid)
        processes = [parent, *parent.children(recursive=True)]
        pss = sum(p.memory_full_info().pss for p in processes)
        return pss / 2**20, max(p.memory_info().rss for p in processes) / 2**20

    def worker_rss_mb(self) -> dict[int, float]:
        """Resident memory (VmRSS) of each child process, in MB, by pid: the workers of `streamflow serve`."""
        return {child.pid: vm_rss_mb(child.pid) for child in psutil.Process(self.process.pid).children()}

    def stop(self) -> None:
        """SIGTERM the process group; one still there after 30 s is reported, with each process's Python
        stacks when py-spy is installed, then killed."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within 30 s of SIGTERM; killing it", flush=True)
                self._dump_stacks()
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def _dump_stacks(self) -> None:
        spy = shutil.which("py-spy")
        if spy is None:
            return
        for process in [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children()]:
            dumped = subprocess.run([spy, "dump", "--pid", str(process.pid)], capture_output=True, text=True)
            print(f"  stacks of {process.pid}:\n{dumped.stdout}{dumped.stderr}", flush=True)


def vm_rss_mb(pid: int) -> float:
    """A process's resident set size as the kernel reports it (`VmRSS` of /proc/PID/status, in kB), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} reports no VmRSS (a zombie?)")


def start(
    name: str, args: list[str], env: dict[str, str], ready: Callable[[int], bool], port: int, log: Path
) -> Service:
    """Start `args` in a new process group and wait (up to 3 minutes) until `ready(port)`."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    service = Service(name, port, process)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log}")
        if ready(port):
            return service
        time.sleep(0.5)
    service.stop()
    raise RuntimeError(f"{name} was not ready within 3 minutes; see {log}")


def grpc_serving(port: int, connections: int = 20) -> bool:
    """SERVING on `connections` fresh connections in a row: with several workers on the port, each
    connection reaches one of them, and every worker must have its model before the load starts."""
    return all(check(f"127.0.0.1:{port}", timeout_s=2) == "SERVING" for _ in range(connections))


def http_ok(path: str) -> Callable[[int], bool]:
    def probe(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    return probe


@dataclass
class Served:
    """A `streamflow serve` under test: its main port, and the health port its readiness was probed on."""

    service: Service
    port: int
    health_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_streamflow(env: dict[str, str], extra: dict[str, str], log: Path) -> Served:
    """`streamflow serve` on free ports, `extra` over `env`, once every worker is SERVING on the health port
    (the supervisor's, so a flood of the main port cannot hold the start)."""
    port, health_port = free_port(), free_port()
    ports = {
        "STREAMFLOW_HOST": "127.0.0.1",
        "STREAMFLOW_PORT": str(port),
        "STREAMFLOW_HEALTH_PORT": str(health_port),
    }
    service = start(
        "StreamFlow gRPC",
        [str(BIN / "streamflow"), "serve"],
        {**env, **ports, **extra},
        grpc_serving,
        health_port,
        log,
    )
    return Served(service, port, health_port)


def alternating(rounds: int, variants: dict[str, Callable[[], T]], what: str) -> dict[str, list[T]]:
    """Each variant's measurement, once per round, taken in turn: a shared machine's drift within minutes
    then falls on all of them alike."""
    figures: dict[str, list[T]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for name, measure in variants.items():
            print(f"  {what} {name}, round {round_ + 1} of {rounds}", flush=True)
            figures[name].append(measure())
    return figures
