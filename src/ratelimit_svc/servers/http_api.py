"""The HTTP listener on HOST:PORT: ``/healthcheck`` and ``/json`` (ShouldRateLimit in proto JSON),
and ``start_listener``, the aiohttp runner the debug port shares (docs/operations.md (HTTP port)).

Errors carry their reason as a JSON body (``json_error``; the reference's body is a bare
``Bad Request``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp import web
from google.protobuf import json_format

from ratelimit_svc.errors import (
    BackendError,
    CounterError,
    NoConfigError,
    RequestError,
    SettingsError,
)
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit_svc.servers.health import Health
from ratelimit_svc.service import RateLimitService, request_from_proto, response_to_proto

log = logging.getLogger(__name__)

# In-flight requests get this long to finish when the listener closes (as gRPC's grace).
SHUTDOWN_TIMEOUT_SECONDS = 5.0
IDLE_TIMEOUT_SECONDS = 60.0  # the HTTP_IDLE_TIMEOUT default


@dataclass
class Listener:
    """A running aiohttp site: ``address`` is host:bound-port, ``port`` the bound port."""

    runner: web.AppRunner
    address: str
    port: int

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close connections."""
        await self.runner.cleanup()


def cannot_listen(what: str, setting: str, host: str, port: int | str, exc: BaseException) -> str:
    """One line for a port that cannot be listened on, naming the settings that choose it."""
    if isinstance(exc, OSError) and exc.errno:
        reason = os.strerror(exc.errno)  # uvloop's strerror repeats the address
    else:
        reason = str(exc)
    hint = "another process holds it? " if "in use" in reason.lower() else ""
    return (
        f"cannot listen for {what} on {host}:{port}: {reason} ({hint}choose another with {setting})"
    )


async def start_listener(
    app: web.Application,
    host: str,
    port: int,
    *,
    what: str = "HTTP",
    setting: str = "HOST/PORT",
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
) -> Listener:
    """Listen on ``host:port``; a port in use is a SettingsError naming ``setting``.
    ``idle_timeout``: a connection with no request in flight for this long is closed, from its
    first byte on (HTTP_IDLE_TIMEOUT; aiohttp's own default is an hour)."""
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        keepalive_timeout=idle_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=False)
        await site.start()
        bound = runner.addresses[0][1]
    except OSError as exc:
        await runner.cleanup()
        raise SettingsError(cannot_listen(what, setting, host, port, exc)) from None
    except BaseException:
        await runner.cleanup()
        raise
    return Listener(runner, f"{host}:{bound}", bound)


MAX_REASON_CHARS = 500  # a reason quoting a huge bad value is cut


def json_error(status: HTTPStatus, reason: str) -> web.Response:
    """An error as JSON: ``{"code": 400, "error": "Bad Request", "message": reason}``.

    The reference answers a bare ``Bad Request``; the reason in the body tells the caller what to
    fix without access to the service's log. json.dumps escapes whatever the reason quotes.
    """
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + "..."
    body = {"code": int(status), "error": status.phrase, "message": reason}
    return web.json_response(body, status=status)


def build_http_app(service: RateLimitService, health: Health) -> web.Application:
    async def healthcheck(request: web.Request) -> web.Response:
        if health.healthy:
            return web.Response(text="OK")
        return web.Response(status=HTTPStatus.INTERNAL_SERVER_ERROR)

    async def json_endpoint(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except ConnectionError as exc:  # the client went away mid-upload: nothing to answer
            log.debug("/json: connection lost while reading the request body: %s", exc)
            return json_error(HTTPStatus.BAD_REQUEST, "the request body was cut short")
        message = rls_pb2.RateLimitRequest()
        try:
            json_format.Parse(body, message)
        except json_format.ParseError as exc:
            log.debug("/json: bad request body: %s", exc)
            return json_error(HTTPStatus.BAD_REQUEST, f"invalid RateLimitRequest JSON: {exc}")
        except UnicodeDecodeError:
            return json_error(HTTPStatus.BAD_REQUEST, "the request body is not UTF-8 text")
        try:
            decision = await service.should_rate_limit(request_from_proto(message))
        except RequestError as exc:
            log.debug("/json: %s", exc)
            return json_error(HTTPStatus.BAD_REQUEST, str(exc))
        except (BackendError, NoConfigError) as exc:
            log.debug("/json: %s", exc)
            return json_error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except CounterError as exc:  # gRPC's FAILED_PRECONDITION: a server-side key, not retriable
            log.debug("/json: %s", exc)
            return json_error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
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
    service: RateLimitService,
    health: Health,
    host: str,
    port: int,
    *,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
) -> Listener:
    listener = await start_listener(
        build_http_app(service, health), host, port, idle_timeout=idle_timeout
    )
    log.warning("Listening for HTTP on '%s'", listener.address)
    return listener
