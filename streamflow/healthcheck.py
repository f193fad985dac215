"""Probe of the serving container: asks the server's ``grpc.health.v1`` service whether it is SERVING.

``python -m streamflow.healthcheck`` is the Dockerfile's HEALTHCHECK. It exits 0 when the server on
127.0.0.1:STREAMFLOW_HEALTH_PORT (the plaintext health-only port, so the probe needs no certificate or
token; STREAMFLOW_PORT when there is none) reports SERVING, 1 otherwise (NOT_SERVING, unreachable, or no
answer within the timeout), printing the status either way, as Docker keeps that output in ``docker inspect``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.settings import load_settings


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The health status name the server at address reports for service (``""`` is the whole server).

    Each call opens its own connection, so with several workers on one port repeated probes reach any of them.
    """
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 if SERVING, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m streamflow.healthcheck", description=__doc__)
    parser.add_argument(
        "--address",
        help="host:port of the server (default: 127.0.0.1:STREAMFLOW_HEALTH_PORT, else STREAMFLOW_PORT)",
    )
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default: %(default)s)")
    args = parser.parse_args(argv)
    settings = load_settings()
    address = args.address or f"127.0.0.1:{settings.health_port or settings.port}"
    status = check(address, args.service, args.timeout)
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
