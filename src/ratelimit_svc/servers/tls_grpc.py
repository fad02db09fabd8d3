"""gRPC TLS on the grpcio transport (docs/operations.md (gRPC TLS and mTLS)): the certificate
files of ``servers/tls.py`` as grpcio's reloading server credentials, and ``SanCheck``, the
interceptor refusing a client certificate without GRPC_CLIENT_TLS_SAN. Apart from ``tls.py`` so
that only the grpcio transport imports grpc.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ratelimit_svc.servers.tls import CertificateFiles, Pems, san_refusal
from ratelimit_svc.settings.model import GrpcTlsSettings

log = logging.getLogger(__name__)


def _grpc_configuration(pems: Pems) -> Any:
    chain, key, root = pems
    return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=root)


def server_credentials(
    settings: GrpcTlsSettings,
) -> tuple[grpc.ServerCredentials, CertificateFiles]:
    files = CertificateFiles.of(settings)
    credentials = grpc.dynamic_ssl_server_credentials(
        _grpc_configuration(files.first_load()),
        lambda: _fetch(files),
        require_client_authentication=bool(settings.client_tls_cacert),
    )
    return credentials, files


def _fetch(files: CertificateFiles) -> Any:
    """gRPC's certificate-configuration fetcher: a new configuration, or None for no change."""
    pems = files.reload()
    return None if pems is None else _grpc_configuration(pems)


_Handler = Callable[..., Any]


class SanCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls whose client certificate lacks ``san`` among its subject alternative names."""

    def __init__(self, san: str) -> None:
        self.san = san.encode()

    def allowed(self, context: grpc.aio.ServicerContext) -> bool:
        names = context.auth_context().get("x509_subject_alternative_name", [])
        return self.san in names

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary))
        return handler._replace(stream_stream=self._streaming(handler.stream_stream))

    async def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        log.debug(
            "refused a call from %s: client certificate without SAN %r",
            context.peer(),
            self.san.decode(),
        )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, san_refusal(self.san.decode()))

    def _unary(self, behaviour: _Handler) -> _Handler:
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not self.allowed(context):
                await self._refuse(context)
            return await behaviour(request, context)

        return checked

    def _streaming(self, behaviour: _Handler) -> _Handler:
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not self.allowed(context):
                await self._refuse(context)
            result = behaviour(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result  # a handler that writes with context.write()

        return checked
