"""The service inside pyvoy: the ASGI application Envoy's embedded Python runs (docs/transports.md).

Envoy imports ``ratelimit_svc.workers.embedded:app``. ASGI lifespan startup builds the whole
``App`` (backend, config, watcher, HTTP and debug ports, stats, tracing) from the environment,
with the gRPC port served by ``servers.grpc_asgi`` instead of grpc.aio; after that every HTTP/2
stream Envoy accepts is a call to it. The process that started Envoy (``servers.pyvoy``) talks to
this one over a socket pair, one line per message: we say ``starting`` and ``ready`` (or
``failed``); it says ``status`` on SIGUSR1 (we answer with the App's status) and ``stop`` on
SIGTERM, and we drain as ``App`` does (unhealthy at once, answering for SHUTDOWN_DRAIN_SECONDS,
in-flight calls finished) and close everything before saying ``stopped``, after which it stops
Envoy. As one of WORKERS processes, the app is a gRPC worker
(workers/roles.py) linked to the primary instead, which sends its configs and says when to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
from dataclasses import replace
from typing import Any

from ratelimit_svc.app import App, cancel_and_wait
from ratelimit_svc.config.snapshot import decode
from ratelimit_svc.errors import RateLimitSvcError
from ratelimit_svc.logsetup import configure_logging
from ratelimit_svc.servers import pyvoy
from ratelimit_svc.servers.grpc_asgi import (
    AsgiGrpc,
    GrpcAsgiApp,
    Receive,
    Scope,
    Send,
    start_asgi_grpc,
)
from ratelimit_svc.servers.pyvoy import (
    ADMIN_SOCKET_ENV,
    CONTROL_FD_ENV,
    TLS_DIRECTORY_ENV,
    WORKER_COUNT_ENV,
    WORKER_INDEX_ENV,
    WORKER_LINK_FD_ENV,
)
from ratelimit_svc.servers.tls import SdsFiles
from ratelimit_svc.service import RateLimitService
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.workers.resident import release_file_pages
from ratelimit_svc.workers.roles import worker_app
from ratelimit_svc.workers.supervisor import Link

log = logging.getLogger(__name__)

ANSWERS_SENT_SECONDS = 2.0  # bound on waiting for Envoy to send the last answers out


async def _grpc_in_envoy(service: RateLimitService, settings: Settings, serving: bool) -> AsgiGrpc:
    """The gRPC port of an App inside Envoy: stopping it closes Envoy's listener too."""
    admin = os.environ.get(ADMIN_SOCKET_ENV)
    stop_listening = functools.partial(pyvoy.stop_listening, admin) if admin else None
    return await start_asgi_grpc(service, settings, serving, stop_listening)


async def _listening(admin: str) -> None:
    """Until Envoy listens; then, its startup being over, the file pages only starting touched
    are let go (workers/resident.py)."""
    await pyvoy.wait_listening(admin)
    release_file_pages()


async def _answers_sent() -> None:
    """Before Envoy stops: every answer the app gave has left Envoy."""
    if admin := os.environ.get(ADMIN_SOCKET_ENV):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANSWERS_SENT_SECONDS):
                await pyvoy.wait_requests_done(admin)


async def _close(app: App, certificates: asyncio.Task[None] | None) -> None:
    """The App's drain and close, then wait until its answers have left Envoy."""
    if certificates is not None:
        await cancel_and_wait(certificates)
    app.stop()
    try:
        await app.__aexit__(None, None, None)
    except Exception:
        log.exception("error while shutting down")
    await _answers_sent()


def _watch_certificates(settings: Settings) -> asyncio.Task[None] | None:
    """With GRPC_SERVER_USE_TLS, the task that has Envoy read changed certificate files again
    (servers/tls.py: SdsFiles, written first by the process that started Envoy)."""
    directory = os.environ.get(TLS_DIRECTORY_ENV)
    if not settings.grpc_tls.server_use_tls or directory is None:
        return None
    secrets = SdsFiles(settings.grpc_tls, directory)
    return asyncio.get_running_loop().create_task(secrets.watch(), name="tls-reload")


class Embedded:
    """The ASGI callable Envoy is given: lifespan runs the App, HTTP streams go to its gRPC."""

    def __init__(self) -> None:
        self.app: App | None = None
        self.grpc: GrpcAsgiApp | None = None
        self.control: socket.socket | None = None
        self._certificates: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        grpc = self.grpc
        if grpc is not None:
            await grpc(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    def _tell(self, message: str) -> None:
        if self.control is not None:
            with contextlib.suppress(OSError):
                self.control.sendall(message.encode() + b"\n")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        if (link_fd := os.environ.get(WORKER_LINK_FD_ENV)) is not None:
            await self._worker_lifespan(int(link_fd), receive, send)
            return
        fd = os.environ.get(CONTROL_FD_ENV)
        if fd is not None:
            self.control = socket.socket(fileno=int(fd))
            self.control.setblocking(False)
        self._tell("starting")
        starting = asyncio.ensure_future(self._start())
        orders = asyncio.ensure_future(self._orders())
        await asyncio.wait((starting, orders), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # told to stop while starting (waiting for the backend)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            self._tell("stopped")
            await send({"type": "lifespan.startup.failed", "message": "stopped while starting"})
            return
        if (error := starting.exception()) is not None:
            orders.cancel()
            self._tell("failed")
            await send({"type": "lifespan.startup.failed", "message": str(error)})
            return
        self._tell("ready")
        await send({"type": "lifespan.startup.complete"})
        shutdown = asyncio.ensure_future(receive())
        await asyncio.wait((orders, shutdown), return_when=asyncio.FIRST_COMPLETED)
        supervisor_gone = orders.done() and not orders.result()
        orders.cancel()
        await self._stop()
        if supervisor_gone:  # nobody will stop Envoy: stop it ourselves
            os.kill(os.getpid(), signal.SIGTERM)
        await shutdown
        await send({"type": "lifespan.shutdown.complete"})

    async def _worker_lifespan(self, link_fd: int, receive: Receive, send: Send) -> None:
        """One of WORKERS Envoys: a ``WorkerApp`` linked to the primary, which sends the config
        and says when to stop (then we drain and stop our Envoy)."""
        try:
            settings = Settings.from_env(os.environ)
            settings = replace(
                settings,
                workers=int(os.environ[WORKER_COUNT_ENV]),
                stats=replace(settings.stats, disable_stats=True),
            )
            configure_logging(settings)
            link = await Link.open(socket.socket(fileno=link_fd))
            message = await link.receive()
            if message is None or message[0] != "config":
                raise RuntimeError("the primary went away before sending the config")
            config = await decode(message[1])  # the primary sends the encoded snapshot
            admin = os.environ[ADMIN_SOCKET_ENV]
            app = worker_app(
                settings, link, config, grpc_server=_grpc_in_envoy,
                listening=functools.partial(_listening, admin),
            )  # fmt: skip
            await app.__aenter__()
        except Exception as exc:
            index = os.environ.get(WORKER_INDEX_ENV)
            log.error("gRPC worker %s (pyvoy) could not start: %s", index, exc)
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        assert isinstance(app.grpc, AsgiGrpc)
        self.grpc = app.grpc.asgi
        certificates = _watch_certificates(settings)
        await send({"type": "lifespan.startup.complete"})
        running = asyncio.ensure_future(app.run())
        shutdown = asyncio.ensure_future(receive())
        await asyncio.wait((running, shutdown), return_when=asyncio.FIRST_COMPLETED)
        await _close(app, certificates)
        if running.done():  # told to stop (or the primary went away): stop our Envoy too
            os.kill(os.getpid(), signal.SIGTERM)
        await shutdown
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self) -> None:
        try:
            settings = Settings.from_env(os.environ)
            configure_logging(settings)
            app = App(settings, grpc_server=_grpc_in_envoy)
            await app.__aenter__()
        except RateLimitSvcError as exc:
            log.error("%s", exc)
            raise
        self.app = app
        if admin := os.environ.get(ADMIN_SOCKET_ENV):
            listening = asyncio.get_running_loop().create_task(_listening(admin))
            app.defer(functools.partial(cancel_and_wait, listening))
        assert isinstance(app.grpc, AsgiGrpc)
        self.grpc = app.grpc.asgi
        self._certificates = _watch_certificates(settings)

    async def _orders(self) -> bool:
        """Until the supervisor says ``stop`` (True) or goes away (False); ``status`` (its
        SIGUSR1) is answered with the App's status line (docs/reliability.md)."""
        if self.control is None:
            await asyncio.Event().wait()
        assert self.control is not None
        loop = asyncio.get_running_loop()
        buffer = b""
        while True:
            while b"\n" not in buffer:
                try:
                    data = await loop.sock_recv(self.control, 64)
                except OSError:  # reset: it died with our lines unread (a SIGKILL)
                    data = b""
                if not data:
                    return False
                buffer += data
            order, _, buffer = buffer.partition(b"\n")
            if order == b"stop":
                return True
            if order == b"status":
                status = "starting" if self.app is None else self.app.status()
                self._tell(pyvoy.STATUS_PREFIX + status)

    async def _stop(self) -> None:
        """The App's own drain and close, once, then ``stopped`` to the supervisor."""
        app, self.app = self.app, None
        if app is None:
            return
        await _close(app, self._certificates)
        self._tell("stopped")


app: Any = Embedded()
