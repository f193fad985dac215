"""grpc.health.v1 transitions (Check and Watch) and server reflection, on and off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from mlflow import MlflowClient

from streamflow.server.app import HEALTH_SERVICES, SERVICE_NAME
from streamflow.server.errors import echo, trailer_bytes
from streamflow.settings import Settings
from tests.fixtures.serving import start_server, wire_error

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_is_not_serving_until_a_model_loads_then_serving_then_not_serving_on_shutdown(
    fresh_embedded_settings: Settings,
) -> None:
    settings = fresh_embedded_settings
    alias = "health_test"  # set by nobody yet: the server starts without a model
    with (
        start_server(
            settings, wait_for_model=False, model_uri=f"models:/{settings.model_name}@{alias}"
        ) as running,
        grpc.insecure_channel(running.local_address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        watches = {
            name: health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=120)
            for name in HEALTH_SERVICES
        }
        before = {name: next(watch).status for name, watch in watches.items()}
        checked_before = {
            name: health.Check(health_pb2.HealthCheckRequest(service=name)).status for name in HEALTH_SERVICES
        }

        MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri).set_registered_model_alias(
            settings.model_name, alias, "1"
        )
        after_load = {name: next(watch).status for name, watch in watches.items()}
        checked_after = {
            name: health.Check(health_pb2.HealthCheckRequest(service=name)).status for name in HEALTH_SERVICES
        }

        running.stop(grace=1.0)
        on_shutdown = {name: next(watch).status for name, watch in watches.items()}

    assert before == checked_before == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING}
    assert after_load == checked_after == {"": SERVING, SERVICE_NAME: SERVING}
    assert on_shutdown == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING}


@pytest.mark.parametrize("service", ["no.such.Service", "é" * 100_000], ids=["short", "100,000 characters"])
def test_health_of_an_unknown_service_is_not_found(served_embedded: str, service: str) -> None:
    with grpc.insecure_channel(served_embedded) as channel, pytest.raises(grpc.RpcError) as failure:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))

    error = wire_error(failure.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info.reason == "SERVICE_UNKNOWN"
    assert dict(error.info.metadata) == {"service": echo(service)}
    assert trailer_bytes(error.status) < 8 * 1024


def test_reflection_lists_the_services_and_resolves_the_error_detail_types(served_embedded: str) -> None:
    with grpc.insecure_channel(served_embedded) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE_NAME)
        details = [
            pool.FindMessageTypeByName(f"google.rpc.{name}")
            for name in ("ErrorInfo", "BadRequest", "PreconditionFailure")
        ]

    reflection = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    assert services == {SERVICE_NAME, "grpc.health.v1.Health", *reflection}
    assert [m.name for m in service.methods] == ["Predict", "BatchPredict", "ModelInfo"]
    assert [d.full_name for d in details] == [
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.PreconditionFailure",
    ]


def test_grpcurl_prints_error_details_decoded_through_reflection(served_embedded: str) -> None:
    result = subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-format-error",
            "-d",
            '{"user_id": "9999-99999"}',
            served_embedded,
            f"{SERVICE_NAME}/Predict",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 64 + grpc.StatusCode.NOT_FOUND.value[0], result.stderr
    status = json.loads(result.stderr)  # grpcurl prints a failed call's status on stderr
    info, failure = status["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (info["reason"], info["metadata"]["userId"]) == ("ENTITY_NOT_FOUND", "9999-99999")
    assert failure["@type"] == "type.googleapis.com/google.rpc.PreconditionFailure"
    assert len(failure["violations"]) == 14


def test_reflection_can_be_turned_off(embedded_settings: Settings) -> None:
    with (
        start_server(embedded_settings, reflection=False) as running,
        grpc.insecure_channel(running.local_address) as channel,
        pytest.raises(grpc.RpcError) as failure,
    ):
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))

    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
