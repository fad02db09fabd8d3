"""gRPC server TLS and mTLS (GRPC_SERVER_USE_TLS, GRPC_SERVER_TLS_*, GRPC_CLIENT_TLS_*): credentials
whose certificate files are re-read when they change, and ``SanCheck``, the interceptor that
checks a client certificate's SAN (docs/operations.md (gRPC TLS and mTLS)).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.settings.model import GrpcTlsSettings

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """The server's key, certificate chain and (for mTLS) client CA, as files on disk."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._stamp: _Stamp = ()
        self.loads = 0

    def _paths(self) -> tuple[str, ...]:
        return (self.cert, self.key, self.client_ca) if self.client_ca else (self.cert, self.key)

    def _current_stamp(self) -> _Stamp:
        stamps = []
        for path in self._paths():
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def load(self) -> Any:
        """Read the files now; raises OSError or ValueError when they are unusable."""
        with self._lock:
            stamp = self._current_stamp()
            config = self._read()
            self._stamp = stamp
            self.loads += 1
            return config

    def _read(self) -> Any:
        with open(self.cert, "rb") as f:
            chain = f.read()
        with open(self.key, "rb") as f:
            key = f.read()
        if b"-----BEGIN" not in chain or b"-----BEGIN" not in key:
            raise ValueError("not a PEM certificate and key")
        root = None
        if self.client_ca:
            with open(self.client_ca, "rb") as f:
                root = f.read()
            if b"-----BEGIN" not in root:
                raise ValueError(f"{self.client_ca}: not a PEM certificate")
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=root)

    def fetch(self) -> Any:
        """gRPC's certificate-configuration fetcher: a new configuration, or None for no change."""
        try:
            if self._current_stamp() == self._stamp:
                return None
            config = self.load()
        except (OSError, ValueError) as exc:
            log.error("gRPC TLS: keeping the current certificate: cannot load %s: %s",
                      ", ".join(self._paths()), exc)
            return None
        log.warning("gRPC TLS: loaded a new server certificate from %s", self.cert)
        return config


def server_credentials(
    settings: GrpcTlsSettings,
) -> tuple[grpc.ServerCredentials, CertificateFiles]:
    if not settings.server_tls_cert or not settings.server_tls_key:
        raise SettingsError(
            "GRPC_SERVER_USE_TLS=true needs GRPC_SERVER_TLS_CERT and GRPC_SERVER_TLS_KEY"
        )
    files = CertificateFiles(
        settings.server_tls_cert,
        settings.server_tls_key,
        settings.client_tls_cacert,
    )
    try:
        initial = files.load()
    except (OSError, ValueError) as exc:
        raise SettingsError(f"gRPC TLS: cannot load the server certificate: {exc}") from None
    credentials = grpc.dynamic_ssl_server_credentials(
        initial, files.fetch, require_client_authentication=bool(settings.client_tls_cacert)
    )
    return credentials, files


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
        log.debug("refused a call from %s: client certificate without SAN %r",
                  context.peer(), self.san.decode())
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"client certificate does not carry the subject alternative name {self.san.decode()!r}",
        )

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
