"""The HTTP listener on HOST:PORT: ``/healthcheck`` and ``/json`` (ShouldRateLimit in proto JSON),
and ``start_listener``, the aiohttp runner the debug port shares (docs/operations.md (HTTP port)).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp import web
from google.protobuf import json_format

from ratelimit_svc.errors import BackendError, CounterError, NoConfigError, RequestError
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit_svc.servers.health import Health
from ratelimit_svc.service import RateLimitService, request_from_proto, response_to_proto

log = logging.getLogger(__name__)

# In-flight requests get this long to finish when the listener closes (as gRPC's grace).
SHUTDOWN_TIMEOUT_SECONDS = 5.0


@dataclass
class Listener:
    """A running aiohttp site: ``address`` is host:bound-port, ``port`` the bound port."""

    runner: web.AppRunner
    address: str
    port: int

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close connections."""
        await self.runner.cleanup()


async def start_listener(app: web.Application, host: str, port: int) -> Listener:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=False)
        await site.start()
        bound = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return Listener(runner, f"{host}:{bound}", bound)


def status_text(status: HTTPStatus) -> web.Response:
    """Like Go's ``http.Error(w, http.StatusText(code), code)``."""
    return web.Response(status=status, text=f"{status.phrase}\n")


def build_http_app(service: RateLimitService, health: Health) -> web.Application:
    async def healthcheck(request: web.Request) -> web.Response:
        if health.healthy:
            return web.Response(text="OK")
        return web.Response(status=HTTPStatus.INTERNAL_SERVER_ERROR)

    async def json_endpoint(request: web.Request) -> web.Response:
        body = await request.read()
        message = rls_pb2.RateLimitRequest()
        try:
            json_format.Parse(body, message)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            log.debug("/json: bad request body: %s", exc)
            return status_text(HTTPStatus.BAD_REQUEST)
        try:
            decision = await service.should_rate_limit(request_from_proto(message))
        except RequestError as exc:
            log.debug("/json: %s", exc)
            return status_text(HTTPStatus.BAD_REQUEST)
        except (BackendError, NoConfigError) as exc:
            log.debug("/json: %s", exc)
            return status_text(HTTPStatus.SERVICE_UNAVAILABLE)
        except CounterError as exc:  # gRPC's FAILED_PRECONDITION: a server-side key, not retriable
            log.debug("/json: %s", exc)
            return status_text(HTTPStatus.INTERNAL_SERVER_ERROR)
        over = decision.overall is Code.OVER_LIMIT
        status = HTTPStatus.TOO_MANY_REQUESTS if over else HTTPStatus.OK
        return web.Response(
            status=status,
            text=json.dumps(
                json_format.MessageToDict(response_to_proto(decision)), separators=(",", ":")
            ),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_route("*", "/healthcheck", healthcheck)
    app.router.add_route("*", "/json", json_endpoint)
    return app


async def start_http_server(
    service: RateLimitService, health: Health, host: str, port: int
) -> Listener:
    listener = await start_listener(build_http_app(service, health), host, port)
    log.warning("Listening for HTTP on '%s'", listener.address)
    return listener
