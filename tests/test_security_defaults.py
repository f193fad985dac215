"""Safe defaults: the embedded demo stays on the loopback interface and serves reflection to its one user;
the production profile listens everywhere (behind the operator's network) and keeps the service's shape to
itself."""

from __future__ import annotations

import os
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.settings import Profile, Settings
from tests.fixtures.serving import start_server


def test_the_profiles_pick_their_address_and_reflection() -> None:
    embedded, production = Settings(), Settings(profile=Profile.PRODUCTION)

    assert (embedded.listen_host, embedded.reflection_on) == ("127.0.0.1", True)
    assert (production.listen_host, production.reflection_on) == ("0.0.0.0", False)
    explicit = Settings(profile=Profile.PRODUCTION, host="::", reflection=True)
    assert (explicit.listen_host, explicit.reflection_on) == ("::", True)


def outward_address() -> str | None:
    """An IPv4 address of this machine other than loopback (the one a route to the outside would use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def health_code(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_an_embedded_server_answers_on_loopback_only(embedded_settings: Settings) -> None:
    outward = outward_address()
    if outward is None:
        assert not os.environ.get("CI"), "CI machines have an address besides loopback"
        pytest.skip("this machine has no address besides loopback")
    with start_server(embedded_settings, host=None) as running:  # the profile's default address
        assert health_code(f"127.0.0.1:{running.port}") is grpc.StatusCode.OK
        assert health_code(f"{outward}:{running.port}") is grpc.StatusCode.UNAVAILABLE
