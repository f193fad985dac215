"""`grpc.health.v1.Health` on the server's event loop: a status per service name, Check and Watch.

grpc's own asyncio servicer keeps every Watch stream open through a shutdown, so one watching probe or load
balancer held the drain for the whole grace period. Here the drain reports NOT_SERVING to every watcher and
then ends its stream (OK), so the server stops as soon as its real calls are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.server.errors import UnknownService

ServingStatus = int
"""A `HealthCheckResponse.ServingStatus` value."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    """Health of the named services; every method runs on the server's event loop."""

    def __init__(self, services: Iterable[str]) -> None:
        self._statuses: dict[str, ServingStatus] = dict.fromkeys(services, NOT_SERVING)
        self._changed = asyncio.Event()  # set and replaced at each change, waking every watcher
        self._draining = False

    def set(self, status: ServingStatus) -> None:
        """Report `status` for every service; ignored once the drain has started."""
        if not self._draining:
            self._update(status)

    def start_drain(self) -> None:
        """NOT_SERVING for good; open Watch streams send it and end."""
        self._update(NOT_SERVING)
        self._draining = True

    def _update(self, status: ServingStatus) -> None:
        self._statuses = dict.fromkeys(self._statuses, status)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            raise UnknownService(request.service)  # NOT_FOUND, as grpc.health.v1 specifies
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        last: ServingStatus | None = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
                continue  # the status may have changed (the drain started) while the write waited
            if self._draining:
                return
            await changed.wait()
