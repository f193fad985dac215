"""Drives gRPC (HTTP/2) and REST (HTTP/1.1) endpoints with h2load: no Python client's GIL in the load path.

A unary gRPC call is an HTTP/2 POST whose body is one gRPC frame (flag byte 0, 4-byte big-endian length, the
serialized request). h2load only sees the HTTP status, so callers check the grpc-status of the same request
separately. Latency percentiles come from h2load's per-request log; throughput from its own summary.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
JSON_HEADERS = ("content-type: application/json",)


SERVICE = "streamflow.serving.v1.PredictionService"


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class LoadResult:
    """What one h2load run measured."""

    requests: int
    failed: int
    throughput: float
    """Completed requests per second over the measured period."""
    latencies_ms: np.ndarray

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


@dataclass(frozen=True)
class Endpoint:
    """A URL to POST one fixed body to."""

    url: str
    body: bytes
    headers: tuple[str, ...]
    http1: bool = False
    status_unreadable: bool = False
    """h2load's HTTP/1 parser records no status when the status line has no reason phrase (Hypercorn sends
    none): every answer then counts, and the caller checks the answers with a real client instead."""


def grpc_call(base: str, method: str, request: Message, headers: tuple[str, ...] = GRPC_HEADERS) -> Endpoint:
    """`request` to PredictionService's `method` at `base` (e.g. `http://127.0.0.1:PORT`)."""
    return Endpoint(f"{base}/{SERVICE}/{method}", grpc_frame(request.SerializeToString()), headers)


def require_h2load() -> str:
    """The h2load executable (Debian package nghttp2-client; `make bench` installs it)."""
    path = shutil.which("h2load")
    if path is None:
        raise SystemExit("h2load not found: install the Debian package nghttp2-client (make bench does).")
    return path


_LONGEST_S = 160.0
"""How long a measured period may grow to for a service too slow for the one asked (see `run`)."""


def run(
    endpoint: Endpoint, concurrency: int, duration_s: float, warm_up_s: float = 1.0, streams: int = 1
) -> LoadResult:
    """POST `endpoint` from `concurrency` connections, `streams` requests in flight on each, for
    `duration_s`.

    h2load counts only the requests started in the measured period: when the calls in flight at its start take
    longer than the whole period (a slow service at high concurrency on a busy machine), it measures none. The
    warm-up and the period are then made four times longer, as often as needed up to `_LONGEST_S`, and a line
    says so."""
    while True:
        result = _run_once(endpoint, concurrency, duration_s, warm_up_s, streams)
        if result is not None:
            return result
        if duration_s * 4 > _LONGEST_S:
            raise RuntimeError(
                f"no request of {endpoint.url} at concurrency {concurrency} started and ended within"
                f" {duration_s:g} s: the service is too slow to measure"
            )
        duration_s, warm_up_s = duration_s * 4, warm_up_s * 4
        print(
            f"    no request ended within the measured period at concurrency {concurrency};"
            f" measuring over {duration_s:g} s after {warm_up_s:g} s of warm-up",
            flush=True,
        )


def _run_once(
    endpoint: Endpoint, concurrency: int, duration_s: float, warm_up_s: float, streams: int
) -> LoadResult | None:
    """One h2load run; None when no request started in the measured period."""
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(endpoint.body)
        log = Path(tmp) / "log.tsv"
        args = [
            require_h2load(),
            "--clients",
            str(concurrency),
            "--max-concurrent-streams",
            str(streams),
            "--threads",
            "1",
            f"--duration={duration_s:g}",
            f"--warm-up-time={warm_up_s:g}",
            f"--data={body}",
            f"--log-file={log}",
        ]
        for header in endpoint.headers:
            args += ["--header", header]
        if endpoint.http1:
            args.append("--h1")
        out = subprocess.run([*args, endpoint.url], capture_output=True, text=True, check=True).stdout
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    throughput = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if throughput is None or counts is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    if int(counts.group(1)) == 0:
        return None
    answered = ("200", "0") if endpoint.status_unreadable else ("200",)
    ok = [int(duration) / 1000 for _, status, duration in rows if status in answered]
    if not ok:
        raise RuntimeError(f"no successful request against {endpoint.url}:\n{out}")
    done, succeeded = int(counts.group(2)), int(counts.group(3))
    if endpoint.status_unreadable:
        succeeded = len(ok)
    return LoadResult(
        requests=done,
        failed=done - succeeded,
        throughput=float(throughput.group(1)),
        latencies_ms=np.array(ok),
    )
