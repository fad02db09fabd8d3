"""The gRPC listener: RateLimitService and grpc.health.v1 on GRPC_HOST:GRPC_PORT or GRPC_UDS."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.servers import tls_grpc
from ratelimit_svc.servers.http_api import cannot_listen
from ratelimit_svc.service import SHOULD_RATE_LIMIT, STAT_BACKEND_ERROR, RateLimitService, RpcError
from ratelimit_svc.settings.model import Settings

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", "ratelimit")


def rate_limit_handlers(service: RateLimitService) -> grpc.GenericRpcHandler:
    """ShouldRateLimit as raw bytes in and out: ``RateLimitService.handle`` parses and
    serializes, so grpc never answers UNKNOWN for bytes it could not decode."""

    async def should_rate_limit(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            # The caller's deadline needs no timer here: grpc cancels this task when it passes
            # (Envoy sends one with every request, so a timer each would cost).
            return await service.handle(data, None, context.invocation_metadata)
        except RpcError as exc:
            await context.abort(grpc.StatusCode[exc.code.name], exc.message)
            raise AssertionError("context.abort raises") from None  # for the type checker
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                # The deadline passed while the backend was being waited for: count it as the
                # backend timeout it is (a caller that merely went away is not an error).
                service.stats.add(STAT_BACKEND_ERROR)
            raise

    service_name, _, method = SHOULD_RATE_LIMIT[1:].partition("/")
    handlers = {method: grpc.unary_unary_rpc_method_handler(should_rate_limit)}
    return grpc.method_handlers_generic_handler(service_name, handlers)


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


async def start_grpc_server(
    service: RateLimitService,
    settings: Settings,
    *,
    serving: bool = True,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> GrpcServer:
    """Listen; the health services start as ``serving`` says (the app's health follows).

    With GRPC_SERVER_USE_TLS the port is TLS (mTLS with GRPC_CLIENT_TLS_CACERT, the SAN checked
    first of all interceptors with GRPC_CLIENT_TLS_SAN); ``interceptors`` run after.
    """
    options = [
        # WORKERS processes share the port (workers.py checks nothing else holds it); a single
        # process must fail on a port in use, not share it with a second instance.
        ("grpc.so_reuseport", int(settings.workers > 1)),
        ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grpc_max_connection_age_grace * 1000)),
        # A bigger request is refused by grpc itself with RESOURCE_EXHAUSTED (MAX_REQUEST_BYTES).
        ("grpc.max_receive_message_length", settings.max_request_bytes),
    ]
    credentials = None
    chain = list(interceptors)
    if settings.grpc_tls.server_use_tls:
        credentials, _ = tls_grpc.server_credentials(settings.grpc_tls)
        if settings.grpc_tls.client_tls_san:
            chain.insert(0, tls_grpc.SanCheck(settings.grpc_tls.client_tls_san))
    server = grpc.aio.server(options=options, interceptors=chain or None)
    server.add_generic_rpc_handlers((rate_limit_handlers(service),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = listen_address(settings)
    if not settings.grpc_uds and settings.workers <= 1:
        _check_bindable(settings)  # before grpc, whose own bind error says only "Failed to bind"
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind"
        if settings.grpc_uds:
            message = cannot_listen("gRPC", "GRPC_UDS", "unix", settings.grpc_uds, exc)
        else:
            host, port = settings.grpc_host, settings.grpc_port
            message = cannot_listen("gRPC", "GRPC_HOST/GRPC_PORT", host, port, exc)
        raise SettingsError(message) from None
    await server.start()
    if not settings.grpc_uds:
        address = f"{settings.grpc_host}:{port}"
    log.warning("Listening for gRPC on '%s'", address)
    result = GrpcServer(server, health, address, port)
    await result.set_serving(serving)  # nothing yielded since start(): no RPC was answered yet
    return result


def _check_bindable(settings: Settings) -> None:
    """Raise SettingsError, with the operating system's reason, if GRPC_HOST:GRPC_PORT cannot be
    bound (a port in use, an address not on this machine)."""
    try:
        with socket.create_server((settings.grpc_host, settings.grpc_port)):
            pass
    except OSError as exc:
        host, port = settings.grpc_host, settings.grpc_port
        raise SettingsError(cannot_listen("gRPC", "GRPC_HOST/GRPC_PORT", host, port, exc)) from None
