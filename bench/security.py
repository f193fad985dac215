"""What TLS and a bearer token cost a Predict; part of `make bench`.

The same `streamflow serve` (same build, same settings otherwise) plaintext without tokens, and with TLS (a
throwaway `trustme` CA) plus a tokens file, started in turn round after round so the machine's drift falls
on both alike. h2load drives Predict over `http://` and over `https://` with `authorization: Bearer ...`:
p50 at concurrency 1 and calls/s at concurrency 32. Each connection's TLS handshake happens once, before the
warm-up ends, so the rows are the per-call cost: encryption and the token check. The servers are probed on
the plaintext health port, and one Predict per server is checked to answer OK (h2load sees only HTTP 200,
which a refused token also gets).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import grpc
import trustme

from bench import h2load
from bench.services import alternating, start_streamflow
from streamflow.server.auth import add_token
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Secured:
    """The files and token of the TLS-and-token server."""

    cert: Path
    key: Path
    ca_pem: bytes
    tokens: Path
    token: str


@dataclass(frozen=True)
class Cost:
    plain_p50_ms: float
    secure_p50_ms: float
    plain_rps32: float
    secure_rps32: float


def _secured(folder: Path) -> Secured:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, tokens = folder / "tls.crt", folder / "tls.key", folder / "tokens"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return Secured(cert, key, ca.cert_pem.bytes(), tokens, add_token(tokens, "bench"))


def _check_predict(port: int, user_id: str, secured: Secured | None) -> None:
    """One Predict as h2load will send it must answer OK, not merely HTTP 200."""
    address = f"127.0.0.1:{port}"
    if secured is None:
        channel = grpc.insecure_channel(address)
        metadata: tuple[tuple[str, str], ...] = ()
    else:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(secured.ca_pem))
        metadata = (("authorization", f"Bearer {secured.token}"),)
    with channel:
        pb_grpc.PredictionServiceStub(channel).Predict(
            pb.PredictRequest(user_id=user_id), timeout=30, metadata=metadata
        )


def _measure(
    env: dict[str, str], user_id: str, duration: float, secured: Secured | None, log: Path
) -> tuple[float, float]:
    """(p50 at concurrency 1 in ms, calls/s at concurrency 32) of one freshly started server."""
    extra: dict[str, str] = {}
    headers: tuple[str, ...] = h2load.GRPC_HEADERS
    scheme = "http"
    if secured is not None:
        extra |= {
            "STREAMFLOW_TLS_CERT_FILE": str(secured.cert),
            "STREAMFLOW_TLS_KEY_FILE": str(secured.key),
            "STREAMFLOW_AUTH_TOKENS_FILE": str(secured.tokens),
        }
        headers = (*headers, f"authorization: Bearer {secured.token}")
        scheme = "https"
    served = start_streamflow(env, extra, log)
    try:
        _check_predict(served.port, user_id, secured)
        base = f"{scheme}://127.0.0.1:{served.port}"
        endpoint = h2load.grpc_call(base, "Predict", pb.PredictRequest(user_id=user_id), headers)
        return h2load.run(endpoint, 1, duration).percentile(50), h2load.run(endpoint, 32, duration).throughput
    finally:
        served.service.stop()


def measure_cost(env: dict[str, str], user_id: str, duration: float, rounds: int, log: Path) -> Cost:
    with tempfile.TemporaryDirectory() as folder:
        secured = _secured(Path(folder))
        figures = alternating(
            rounds,
            {
                "plaintext": lambda: _measure(env, user_id, duration, None, log),
                "TLS + token": lambda: _measure(env, user_id, duration, secured, log),
            },
            "security:",
        )
    plain, secure = figures["plaintext"], figures["TLS + token"]
    return Cost(
        median(p50 for p50, _ in plain),
        median(p50 for p50, _ in secure),
        median(rps for _, rps in plain),
        median(rps for _, rps in secure),
    )


def render(cost: Cost) -> str:
    p50_delta = cost.secure_p50_ms - cost.plain_p50_ms
    rps_delta = (cost.plain_rps32 - cost.secure_rps32) / cost.plain_rps32 * 100
    return "\n".join(
        [
            "",
            "Predict over TLS with a token beside plaintext (same server build, started in turn; medians):",
            "",
            "| measure | plaintext | TLS + token | cost |",
            "|---|---:|---:|---:|",
            f"| Predict p50, concurrency 1 (ms) | {cost.plain_p50_ms:.3f} | {cost.secure_p50_ms:.3f} | "
            f"{p50_delta:+.3f} ms |",
            f"| Predict calls/s, concurrency 32 | {cost.plain_rps32:,.0f} | {cost.secure_rps32:,.0f} | "
            f"{rps_delta:+.1f}% |",
            "",
        ]
    )
