"""Counters in Redis (BACKEND_TYPE=redis; SPEC 6.2 and 12): the store for REDIS_TYPE=single and
the pieces every Redis type shares.

``ServerPool`` is a bounded redis-py connection pool to one server, reached by TCP (optionally TLS,
with a CA, a client certificate and optional hostname checking) or a unix socket, authenticated by
password or ``user:password``; its ``exchange`` writes a batch of commands at once and reads every
reply on one pooled connection. A connection that fails, times out or is cancelled mid-exchange
is closed before it returns to the pool, so no later call can read a stale reply; nothing is ever
retried, so no increment is applied twice. ``CommandStore`` turns the ``CounterStore`` contract
into commands (INCRBY+EXPIRE per key, MGET, PING), bounds every call by the operation timeout and,
with REDIS_PIPELINE_WINDOW, coalesces concurrent calls (``pipelining``). ``RedisStore`` is the
single-server store; ``redis_sentinel`` and ``redis_cluster`` build the other types from the same
pieces, and ``open_store`` picks by REDIS_TYPE (and REDIS_PERSECOND, ``persecond``). Startup
retries PING with exponential backoff. Credentials never reach logs, exception messages or ``repr``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
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
from redis.exceptions import RedisError, ResponseError

from ..errors import BackendError
from ..limiter import CounterStore, Increment
from .pipelining import Coalescer

if TYPE_CHECKING:
    from ..settings import RedisSettings, Settings

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


class _UnixConnection(CountedConnection, UnixDomainSocketConnection):
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
        # cost a third of a pipelined call's CPU (README: Performance).
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
        return _UnixConnection, kwargs
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

    async def ping(self) -> None:
        self._checked(await self._round_trip([("PING",)]))

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()

    async def _run(self, commands: Sequence[Command]) -> list[Any]:
        if not commands:
            return []
        if self._coalescer is not None:
            replies = await self._coalescer.submit(commands)
        else:
            replies = await self._round_trip(commands)
        return self._checked(replies)

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


class RedisStore(CommandStore):
    """Counters in one Redis (REDIS_TYPE=single). Sockets open lazily; see ``open_redis_store``."""

    def __init__(self, cfg: RedisSettings, *, op_timeout: float) -> None:
        if cfg.type != "single":
            raise BackendError(f"redis: RedisStore is for REDIS_TYPE=single, not '{cfg.type}'")
        super().__init__(
            op_timeout=op_timeout,
            pipeline_window=cfg.pipeline_window,
            pipeline_limit=cfg.pipeline_limit,
        )
        self._stats = PoolStats()
        self._redactor = Redactor(cfg.auth)
        connection_class, kwargs = connection_options(
            cfg, op_timeout=op_timeout, pool_stats=self._stats
        )
        if connection_class is _UnixConnection:
            kwargs["path"] = cfg.url
        else:
            host, port = split_host_port(cfg.url)
            kwargs.update(host=host, port=port)
        self.address = cfg.url
        self._server = ServerPool.create(
            cfg.url, connection_class, kwargs, pool_size=cfg.pool_size, redact=self._redactor
        )
        self._description = (
            f"{cfg.socket_type}{'+tls' if cfg.tls else ''} {self.address}, "
            f"pool_size={max(cfg.pool_size, 1)}"
        )

    def __repr__(self) -> str:
        return f"RedisStore({self._description})"

    def _redact(self, text: str) -> str:
        return self._redactor(text)

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        return await self._server.exchange(commands)

    async def close(self) -> None:
        await super().close()
        await self._server.close()

    def pool_stats(self) -> dict[str, int]:
        """Open connections, connections ever opened, and those closed from this side."""
        return self._stats.as_dict()


def create_redis_store(cfg: RedisSettings, *, op_timeout: float) -> CommandStore:
    """The store for ``cfg.type`` (single, sentinel or cluster); no I/O yet."""
    if cfg.type == "single":
        return RedisStore(cfg, op_timeout=op_timeout)
    if cfg.type == "sentinel":
        from .redis_sentinel import SentinelStore

        return SentinelStore(cfg, op_timeout=op_timeout)
    if cfg.type == "cluster":
        from .redis_cluster import ClusterStore

        return ClusterStore(cfg, op_timeout=op_timeout)
    raise BackendError(f"redis: unknown REDIS_TYPE '{cfg.type}'")


async def open_redis_store(
    cfg: RedisSettings,
    *,
    op_timeout: float,
    startup_initial_interval: float,
    startup_max_interval: float,
    startup_max_elapsed: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> CommandStore:
    """A store for ``cfg`` (any REDIS_TYPE) whose backend has answered PING.

    Failed attempts are retried after ``startup_initial_interval``, doubling up to
    ``startup_max_interval``; after ``startup_max_elapsed`` seconds (0 = never) the last error is
    raised as BackendError. Elapsed time counts both the sleeps and the attempts, so an injected
    ``sleep`` makes the schedule exact in tests.
    """
    if startup_initial_interval <= 0:
        raise ValueError("startup_initial_interval must be positive")
    store = create_redis_store(cfg, op_timeout=op_timeout)
    started = time.monotonic()
    slept = 0.0
    interval = startup_initial_interval
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                await store.ping()
            except BackendError as exc:
                elapsed = max(time.monotonic() - started, slept)
                remaining = startup_max_elapsed - elapsed
                if startup_max_elapsed > 0 and remaining <= 0:
                    raise BackendError(
                        f"{exc} (gave up after {attempt} attempts in {elapsed:.3g}s)"
                    ) from None
                delay = min(interval, remaining) if startup_max_elapsed > 0 else interval
                log.warning(
                    "redis not ready (attempt %d): %s; retrying in %.3gs", attempt, exc, delay
                )
                await sleep(delay)
                slept += delay
                interval = min(interval * 2, startup_max_interval)
            else:
                if attempt > 1:
                    log.info("redis %s ready after %d attempts", store.address, attempt)
                return store
    except BaseException:
        await store.close()
        raise


async def open_store(settings: Settings, clock: Callable[[], float]) -> CounterStore:
    """The backend table's factory: REDIS_* (and with REDIS_PERSECOND=true, REDIS_PERSECOND_*
    for SECOND-unit counters), REDIS_OP_TIMEOUT and the startup backoff."""

    async def open_one(cfg: RedisSettings) -> CounterStore:
        return await open_redis_store(
            cfg,
            op_timeout=settings.redis_op_timeout,
            startup_initial_interval=settings.redis_startup_initial_interval,
            startup_max_interval=settings.redis_startup_max_interval,
            startup_max_elapsed=settings.redis_startup_max_elapsed_time,
        )

    main = await open_one(settings.redis)
    if not settings.redis_persecond:
        return main
    from .persecond import PerSecondStore

    try:
        per_second = await open_one(settings.redis_persecond_settings)
    except BaseException:
        await main.close()
        raise
    return PerSecondStore(main, per_second)
