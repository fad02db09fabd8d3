"""A small asyncio Redis client (docs/backends.md, The client): ``ServerClient`` owns one
pipelined ``protocol.Connection`` to one server — TCP, TLS with a CA and a client certificate, or a
unix socket; AUTH by ``password`` or ``user:password``; SELECT of a database — and reopens it when
it is lost or reset. Reconnects are spaced by an exponential backoff; a call that cannot wait for
the next attempt within its deadline fails at once with the last error. Nothing is ever resent, so
an increment is never applied twice. Texts never carry credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ratelimit_svc.backends.redis.protocol import (
    RESET_ON,
    Command,
    Connection,
    PoolStats,
    Push,
    ReplyError,
    pack,
)
from ratelimit_svc.errors import BackendError

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 0.02  # seconds before the first reconnect after a failed one, doubling ...
BACKOFF_MAX = 1.0  # ... up to this


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: ``host``/``port``, or ``path`` for a unix socket."""

    host: str = ""
    port: int = 0
    path: str = ""
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0

    @property
    def address(self) -> str:
        """``host:port`` or the socket path; never credentials."""
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tls_context(
    *, cafile: str = "", certfile: str = "", keyfile: str = "", check_hostname: bool = True
) -> ssl.SSLContext:
    """A client context that verifies the server against ``cafile`` (the system CAs if empty),
    presenting ``certfile``/``keyfile`` when given."""
    context = ssl.create_default_context(cafile=cafile or None)
    context.check_hostname = check_hostname
    if certfile:
        context.load_cert_chain(certfile, keyfile or None)
    return context


class ServerClient:
    """One pipelined connection to one server, reconnected (with backoff) when it is lost.

    ``endpoint`` may be a coroutine function, asked anew at each connect (Sentinel).
    """

    def __init__(
        self,
        endpoint: Endpoint | Callable[[], Awaitable[Endpoint]],
        *,
        op_timeout: float,
        redact: Callable[[str], str],
        stats: PoolStats | None = None,
        label: str = "redis",
        reset_on: frozenset[str] = RESET_ON,
        address: str = "",
        on_push: Push | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._on_push = on_push
        self.address = address or (endpoint.address if isinstance(endpoint, Endpoint) else "")
        self.op_timeout = op_timeout
        self.stats = stats if stats is not None else PoolStats()
        self._redact = redact
        self._label = label
        self._reset_on = reset_on
        self._conn: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_INITIAL
        self._last_error = ""
        self._closed = False

    @property
    def connection(self) -> Connection | None:
        """The open connection, if any (for tests)."""
        conn = self._conn
        return conn if conn is not None and not conn.closed else None

    def exchange(
        self, commands: Sequence[Command], deadline: float | None = None
    ) -> Awaitable[list[Any]]:
        """Every command's reply, in order (error replies as ``ReplyError``), within the
        operation timeout (or by ``deadline``, a loop time); failures raise BackendError. On an
        open connection this is the connection's future itself: no coroutine per call."""
        return self.exchange_packed(pack(commands), len(commands), deadline)

    def exchange_packed(
        self, data: bytes, count: int, deadline: float | None = None
    ) -> Awaitable[list[Any]]:
        """``exchange`` of ``count`` commands already packed into ``data``."""
        conn = self._conn
        if conn is None or conn.closed:
            return self._exchange_connecting(data, count, deadline)
        if deadline is None:
            # The connection's loop: asyncio.get_running_loop() makes a getpid() system call
            # on Python 3.11, once per request here.
            deadline = conn.loop.time() + self.op_timeout
        return conn.call(data, count, deadline)

    async def _exchange_connecting(
        self, data: bytes, count: int, deadline: float | None
    ) -> list[Any]:
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.op_timeout
        conn = await self._connection(deadline)
        return await conn.call(data, count, deadline)

    def reset(self, reason: str) -> None:
        """Drop the current connection (its calls fail); the next call reconnects."""
        conn = self._conn
        if conn is not None:
            conn.reset(reason)

    async def close(self) -> None:
        self._closed = True
        task, self._connect_task = self._connect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackendError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- connecting -------------------------------------------------------------------------------

    async def _connection(self, deadline: float) -> Connection:
        if self._closed:
            raise BackendError(f"{self._label}: the store is closed")
        loop = asyncio.get_running_loop()
        pending = self._connecting
        if pending is None:
            if self._retry_at > deadline:
                raise BackendError(
                    f"{self._label}: {self._last_error} "
                    f"(reconnecting in {self._retry_at - loop.time():.2g}s)"
                )
            pending = self._connecting = loop.create_future()
            pending.add_done_callback(_consume)
            self._connect_task = loop.create_task(self._connect(pending))
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(pending)
        except TimeoutError:
            raise BackendError(
                f"{self._label}: no connection to {self.address} within {self.op_timeout:g}s"
            ) from None

    async def _connect(self, result: asyncio.Future[Connection]) -> None:
        loop = asyncio.get_running_loop()
        try:
            delay = self._retry_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            async with asyncio.timeout(self.op_timeout):
                conn = await self._open()
        except BaseException as exc:
            error = self._error(exc)
            self._last_error = str(error).removeprefix(f"{self._label}: ")
            self._retry_at = loop.time() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            if not result.done():
                result.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self._backoff = BACKOFF_INITIAL
            self._retry_at = 0.0
            self._conn = conn
            result.set_result(conn)
        finally:
            self._connecting = None
            self._connect_task = None

    async def _open(self) -> Connection:
        endpoint = self.endpoint if isinstance(self.endpoint, Endpoint) else await self.endpoint()
        self.address = self.address or endpoint.address
        where = endpoint.address
        if where != self.address:  # Sentinel's master: name the store's address too
            where = f"{self.address} at {where}"
        conn = Connection(
            self._label,
            where,
            op_timeout=self.op_timeout,
            stats=self.stats,
            reset_on=self._reset_on,
            on_push=self._on_push,
        )
        loop = asyncio.get_running_loop()
        if endpoint.path:
            await loop.create_unix_connection(lambda: conn, endpoint.path)
        else:
            await loop.create_connection(
                lambda: conn,
                endpoint.host,
                endpoint.port,
                ssl=endpoint.tls,
                server_hostname=(endpoint.server_hostname or endpoint.host)
                if endpoint.tls
                else None,
            )
        try:
            await handshake(conn, endpoint, self._label)
        except BaseException:
            conn.reset("handshake failed")
            raise
        return conn

    def _error(self, exc: BaseException) -> BackendError:
        if isinstance(exc, BackendError):
            text = str(exc).removeprefix(f"{self._label}: ")
        elif isinstance(exc, TimeoutError | asyncio.CancelledError):
            text = f"no connection to {self.address} within {self.op_timeout:g}s"
        else:
            text = str(exc) or type(exc).__name__
        text = self._redact(text)
        if self.address and self.address not in text:
            text = f"{text} ({self.address})"
        return BackendError(f"{self._label}: {text}")


async def handshake(conn: Connection, endpoint: Endpoint, label: str) -> None:
    """AUTH and SELECT, in one write, before any call; an error names neither credential."""
    commands: list[Command] = []
    if endpoint.password is not None:
        if endpoint.username:
            commands.append(("AUTH", endpoint.username, endpoint.password))
        else:
            commands.append(("AUTH", endpoint.password))
    if endpoint.db:
        commands.append(("SELECT", endpoint.db))
    if not commands:
        return
    deadline = asyncio.get_running_loop().time() + conn.op_timeout
    replies = await conn.call(pack(commands), len(commands), deadline)
    for command, reply in zip(commands, replies, strict=True):
        if isinstance(reply, ReplyError):
            # The reply text never quotes the password; the command is named, not shown.
            raise BackendError(f"{label}: {command[0]} failed: {reply} ({endpoint.address})")


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as retrieved (every waiter may have gone)."""
    if not future.cancelled():
        future.exception()
