"""What every Redis store type shares: ``ServerPool`` (a bounded connection pool to one server by
TCP, TLS or unix socket, authenticated by password or ``user:password``, whose ``exchange`` writes a
batch of commands at once and reads every reply on one connection; a connection that fails, times
out or is cancelled mid-exchange is closed, so no stale reply is read and nothing is retried) and
``CommandStore`` (the ``CounterStore`` contract as INCRBY+EXPIRE, MGET and PING, bounded by the
operation timeout, optionally coalesced). Credentials never reach logs or ``repr``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ratelimit_svc.backends.redis import scripts as redis_scripts
from ratelimit_svc.backends.redis.pipelining import Coalescer
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.algorithms import Step, StepResult, refund_unadmitted
from ratelimit_svc.limiter.store import Increment

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import RedisSettings

log = logging.getLogger(__name__)

Command = tuple[str | int, ...]


class _Pool(Protocol):
    """The pool methods used here, as redis-py 8 defines them (the types-redis stubs predate it:
    they lack ``aclose`` and still require ``get_connection``'s deprecated arguments)."""

    async def get_connection(self) -> AbstractConnection: ...

    async def release(self, connection: AbstractConnection) -> None: ...

    async def aclose(self) -> None: ...


class PoolStats:
    """Connection counts for the ``redis_pool.cx_*`` stats, kept by the connections themselves."""

    __slots__ = ("local_close", "total")

    def __init__(self) -> None:
        self.total = 0
        self.local_close = 0

    def as_dict(self) -> dict[str, int]:
        """Open connections, connections ever opened, and those closed from this side."""
        total, closed = self.total, self.local_close
        return {"cx_active": total - closed, "cx_total": total, "cx_local_close": closed}


class CountedConnection(AbstractConnection):
    """Counts opens and local closes; combined with a concrete redis-py connection class."""

    def __init__(self, *, pool_stats: PoolStats, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool_stats = pool_stats

    async def connect(self) -> None:
        was_connected = self.is_connected
        await super().connect()
        if not was_connected and self.is_connected:
            self._pool_stats.total += 1

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        was_connected = self.is_connected
        await super().disconnect(*args, **kwargs)
        if was_connected and not self.is_connected:
            self._pool_stats.local_close += 1


class _TcpConnection(CountedConnection, Connection):
    pass


class _TlsConnection(CountedConnection, SSLConnection):
    pass


class UnixConnection(CountedConnection, UnixDomainSocketConnection):
    pass


def split_auth(auth: str) -> tuple[str | None, str | None]:
    """REDIS_AUTH → (username, password): ``password`` or ``user:password`` (first colon)."""
    if not auth:
        return None, None
    user, colon, password = auth.partition(":")
    return (user, password) if colon else (None, auth)


def split_host_port(url: str, variable: str = "REDIS_URL") -> tuple[str, int]:
    host, colon, port = url.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"redis: invalid {variable} {url!r}: expected host:port")
    return host, int(port)


class Redactor:
    """Masks every credential of one connection setting in texts bound for errors and logs."""

    def __init__(self, *auths: str) -> None:
        secrets: set[str] = set()
        for auth in auths:
            secrets.update(s for s in (auth, split_auth(auth)[1]) if s)
        # Longest first, so "user:pw" is masked before "pw" alone.
        self._secrets = tuple(sorted(secrets, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text


def connection_options(
    cfg: RedisSettings, *, op_timeout: float, pool_stats: PoolStats, tcp: bool = False
) -> tuple[type[AbstractConnection], dict[str, Any]]:
    """The connection class and keyword arguments for ``cfg``'s credentials, socket and TLS.

    ``tcp`` forces TCP whatever REDIS_SOCKET_TYPE says (sentinel and cluster, as the reference
    does); host and port (or the socket path) are left for the caller to add.
    """
    username, password = split_auth(cfg.auth)
    kwargs: dict[str, Any] = {
        "pool_stats": pool_stats,
        "username": username,
        "password": password,
        # No per-read timeout: every exchange is bounded as a whole by REDIS_OP_TIMEOUT (and the
        # connection closed if it expires), so redis-py's own timer around each reply would only
        # cost a third of a pipelined call's CPU (docs/performance.md).
        "socket_timeout": None,
        "socket_connect_timeout": op_timeout,
        # A timed-out INCRBY may still have been applied: never resend it.
        "retry": Retry(NoBackoff(), 0),
        # RESP2, as the reference speaks. redis-py 8 defaults to RESP3, which turns on
        # "maintenance notifications" and with them turns off the pool's check that a pooled
        # socket is not already closed by the server, so the first calls after a Redis
        # restart would fail instead of reconnecting.
        "protocol": 2,
    }
    if cfg.socket_type == "unix" and not tcp:
        if cfg.tls:
            raise BackendError("redis: REDIS_TLS is not supported with REDIS_SOCKET_TYPE=unix")
        return UnixConnection, kwargs
    if not cfg.tls:
        return _TcpConnection, kwargs
    kwargs.update(tls_options(cfg))
    return _TlsConnection, kwargs


def tls_options(cfg: RedisSettings) -> dict[str, Any]:
    """redis-py's SSL keyword arguments for REDIS_TLS_*."""
    return {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": cfg.tls_cacert or None,
        "ssl_certfile": cfg.tls_client_cert or None,
        "ssl_keyfile": cfg.tls_client_key or None,
        # The chain is still verified against the CA; only the name check is skipped.
        "ssl_check_hostname": not cfg.tls_skip_hostname_verification,
    }


class ServerPool:
    """A bounded pool of connections to one Redis server and the one-write exchange on it.

    Waiting for a free connection is not bounded here: callers bound the whole call.
    """

    def __init__(
        self,
        address: str,
        pool: Any,
        *,
        redact: Callable[[str], str],
        label: str = "redis",
    ) -> None:
        self.address = address  # host:port or a socket path; never holds credentials
        self._pool = cast(_Pool, pool)
        self._redact = redact
        self._label = label

    @classmethod
    def create(
        cls,
        address: str,
        connection_class: type[AbstractConnection],
        kwargs: dict[str, Any],
        *,
        pool_size: int,
        redact: Callable[[str], str],
        label: str = "redis",
    ) -> ServerPool:
        # A pool size of 0 would deadlock every call, so it means 1.
        pool = BlockingConnectionPool(
            max_connections=max(pool_size, 1),
            timeout=None,
            connection_class=connection_class,
            **kwargs,
        )
        return cls(address, pool, redact=redact, label=label)

    async def exchange(self, commands: Sequence[Command]) -> list[Any]:
        """Write every command in one go and read every reply, on one pooled connection.

        Error replies come back in place as ``ResponseError``s (the socket stays in step);
        a failed connection raises ``BackendError`` naming this server.
        """
        try:
            conn = await self._pool.get_connection()
            try:
                return await _send_and_read(conn, commands)
            except BaseException:
                # Replies may still be on their way: the socket must never be reused.
                await conn.disconnect(nowait=True)
                raise
            finally:
                await asyncio.shield(self._pool.release(conn))
        except (RedisError, OSError, ValueError) as exc:
            raise self.error(exc) from None

    def error(self, exc: BaseException) -> BackendError:
        """A BackendError whose text names the failure and this server, never a credential.

        redis-py messages can quote command arguments (AUTH's) or connection parameters; callers
        drop the cause for the same reason.
        """
        text = self._redact(str(exc) or type(exc).__name__)
        if self.address not in text:
            text = f"{text} ({self.address})"
        return BackendError(f"{self._label}: {text}")

    async def close(self) -> None:
        await self._pool.aclose()


async def _send_and_read(conn: AbstractConnection, commands: Sequence[Command]) -> list[Any]:
    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:  # the reply was read whole; the socket stays in step
            replies.append(exc)
    return replies


class CommandStore:
    """The ``CounterStore`` contract as Redis commands, over ``_send`` (one round trip).

    Subclasses define ``_send``; every call is bounded by ``op_timeout``. With a pipeline window,
    the commands of concurrent calls are coalesced into one ``_send`` per window.
    """

    label = "redis"
    address = ""

    def __init__(
        self, *, op_timeout: float, pipeline_window: float = 0.0, pipeline_limit: int = 0
    ) -> None:
        self._op_timeout = op_timeout
        self._coalescer = (
            Coalescer(self._round_trip, window=pipeline_window, limit=pipeline_limit)
            if pipeline_window > 0
            else None
        )

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        raise NotImplementedError

    def pool_stats(self) -> dict[str, int]:
        """Connection counts: ``cx_active``, ``cx_total`` and ``cx_local_close``."""
        raise NotImplementedError

    def _redact(self, text: str) -> str:
        return text

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        commands: list[Command] = []
        for inc in increments:
            commands.append(("INCRBY", inc.key, inc.hits))
            commands.append(("EXPIRE", inc.key, inc.ttl))
        replies = await self._run(commands)
        return [self._as_int(reply) for reply in replies[::2]]

    async def get(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        (values,) = await self._run([("MGET", *keys)])
        if not isinstance(values, list) or len(values) != len(keys):
            raise BackendError(f"{self.label}: unexpected reply to MGET from {self.address}")
        return [0 if value is None else self._as_int(value) for value in values]

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        """Run the settle script (docs/algorithms.md) once per group of keys that must meet on
        one server; several groups are settled one by one atomically and refunded together."""
        if not steps:
            return []
        groups = self._script_groups(steps)
        if groups is None:  # the common case: one script for the whole batch
            (reply,) = await self._script([steps], now, refund)
            return [] if refund else redis_scripts.parse(reply, len(steps), self.address)
        batches = [[steps[i] for i in group] for group in groups]
        replies = await self._script(batches, now, refund)
        if refund:
            return []
        results: list[StepResult] = [StepResult(False, False, 0, 0)] * len(steps)
        for group, reply in zip(groups, replies, strict=True):
            parsed = redis_scripts.parse(reply, len(group), self.address)
            for index, result in zip(group, parsed, strict=True):
                results[index] = result
        return await refund_unadmitted(self, steps, results, now)

    async def _script(
        self, batches: Sequence[Sequence[Step]], now: int, refund: bool
    ) -> list[Any]:
        """One EVALSHA per batch; those answered NOSCRIPT once more as EVAL (which loads it)."""
        replies = await self._run(
            [redis_scripts.evalsha(b, now, refund=refund) for b in batches], checked=False
        )
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            again = await self._run(
                [redis_scripts.eval_(batches[i], now, refund=refund) for i in missing],
                checked=False,
            )
            for index, reply in zip(missing, again, strict=True):
                replies[index] = reply
        return self._checked(replies)

    def _script_groups(self, steps: Sequence[Step]) -> list[list[int]] | None:
        """Indexes of the steps one script may run together (None: all of them, on one
        server)."""
        return None

    async def ping(self) -> None:
        self._checked(await self._round_trip([("PING",)]))

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()

    async def _run(self, commands: Sequence[Command], *, checked: bool = True) -> list[Any]:
        if not commands:
            return []
        if self._coalescer is not None:
            replies = await self._coalescer.submit(commands)
        else:
            replies = await self._round_trip(commands)
        return self._checked(replies) if checked else replies

    def _checked(self, replies: list[Any]) -> list[Any]:
        first_error = next((r for r in replies if isinstance(r, ResponseError)), None)
        if first_error is not None:
            text = self._redact(str(first_error))
            if self.address not in text:
                text = f"{text} ({self.address})"
            raise BackendError(f"{self.label}: {text}")
        return replies

    async def _round_trip(self, commands: Sequence[Command]) -> list[Any]:
        """``_send`` bounded by the operation timeout."""
        try:
            async with asyncio.timeout(self._op_timeout):
                return await self._send(commands)
        except TimeoutError:
            raise BackendError(
                f"{self.label}: no answer from {self.address} within {self._op_timeout:g}s"
            ) from None

    def _as_int(self, reply: Any) -> int:
        try:
            return int(reply)
        except (TypeError, ValueError):
            raise BackendError(
                f"{self.label}: {self.address} returned {reply!r} where a counter was expected"
            ) from None








