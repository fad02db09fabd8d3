"""The gRPC listener: RateLimitService and grpc.health.v1 on GRPC_HOST:GRPC_PORT or GRPC_UDS."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from .service import RateLimitService, add_to_server
from .settings import Settings

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", "ratelimit")


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: HealthServicer
    address: str
    port: int

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)


def listen_address(settings: Settings) -> str:
    if settings.grpc_uds:
        return f"unix:{settings.grpc_uds}"
    return f"{settings.grpc_host}:{settings.grpc_port}"


async def start_grpc_server(service: RateLimitService, settings: Settings) -> GrpcServer:
    options = [
        ("grpc.so_reuseport", 0),  # a second instance on the same port must fail, not share it
        ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grpc_max_connection_age_grace * 1000)),
        # A bigger request is refused by grpc itself with RESOURCE_EXHAUSTED (MAX_REQUEST_BYTES).
        ("grpc.max_receive_message_length", settings.max_request_bytes),
    ]
    server = grpc.aio.server(options=options)
    add_to_server(service, server)  # answers INVALID_ARGUMENT for undecodable bytes
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = listen_address(settings)
    port = server.add_insecure_port(address)
    await server.start()
    if not settings.grpc_uds:
        address = f"{settings.grpc_host}:{port}"
    log.warning("Listening for gRPC on '%s'", address)
    result = GrpcServer(server, health, address, port)
    await result.set_serving(True)
    return result
