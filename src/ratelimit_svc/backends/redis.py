"""Counters in one Redis server (BACKEND_TYPE=redis, REDIS_TYPE=single; SPEC 6.2 and 12): a
``CounterStore`` over a bounded redis-py connection pool, reached by TCP (optionally TLS, with a CA,
a client certificate and optional hostname checking) or a unix socket, authenticated by password or
``user:password``. Each call is one exchange on one pooled connection: all commands written at
once, every reply read back, the whole bounded by the operation timeout. A connection that fails,
times out or is cancelled mid-exchange is closed before it returns to the pool, so no later call
can read a stale reply; nothing is ever retried, so no increment is applied twice. Startup retries
PING with exponential backoff. Credentials never reach logs, exception messages or ``repr``.
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
from ..limiter import Increment

if TYPE_CHECKING:
    from ..settings import RedisSettings, Settings

log = logging.getLogger(__name__)

_Command = tuple[str | int, ...]


class _Pool(Protocol):
    """The pool methods used here, as redis-py 8 defines them (the types-redis stubs predate it:
    they lack ``aclose`` and still require ``get_connection``'s deprecated arguments)."""

    async def get_connection(self) -> AbstractConnection: ...

    async def release(self, connection: AbstractConnection) -> None: ...

    async def aclose(self) -> None: ...


class _PoolStats:
    """Connection counts for the ``redis_pool.cx_*`` stats, kept by the connections themselves."""

    __slots__ = ("local_close", "total")

    def __init__(self) -> None:
        self.total = 0
        self.local_close = 0


class _Counted(AbstractConnection):
    """Counts opens and local closes; combined with a concrete redis-py connection class below."""

    def __init__(self, *, pool_stats: _PoolStats, **kwargs: Any) -> None:
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


class _TcpConnection(_Counted, Connection):
    pass


class _TlsConnection(_Counted, SSLConnection):
    pass


class _UnixConnection(_Counted, UnixDomainSocketConnection):
    pass


def split_auth(auth: str) -> tuple[str | None, str | None]:
    """REDIS_AUTH → (username, password): ``password`` or ``user:password`` (first colon)."""
    if not auth:
        return None, None
    user, colon, password = auth.partition(":")
    return (user, password) if colon else (None, auth)


def _split_host_port(url: str) -> tuple[str, int]:
    host, colon, port = url.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"redis: invalid REDIS_URL {url!r}: expected host:port")
    return host, int(port)


class RedisStore:
    """Counters in one Redis (REDIS_TYPE=single). Sockets open lazily; see ``open_redis_store``."""

    def __init__(self, cfg: RedisSettings, *, op_timeout: float) -> None:
        if cfg.type != "single":
            raise BackendError(f"redis type '{cfg.type}' is not supported yet")
        username, password = split_auth(cfg.auth)
        # Every credential string, longest first, so "user:pw" is masked before "pw" alone.
        self._secrets = tuple(sorted({s for s in (cfg.auth, password) if s}, key=len, reverse=True))
        self._op_timeout = op_timeout
        self._stats = _PoolStats()
        kwargs: dict[str, Any] = {
            "pool_stats": self._stats,
            "username": username,
            "password": password,
            "socket_timeout": op_timeout,
            "socket_connect_timeout": op_timeout,
            # A timed-out INCRBY may still have been applied: never resend it.
            "retry": Retry(NoBackoff(), 0),
            # RESP2, as the reference speaks. redis-py 8 defaults to RESP3, which turns on
            # "maintenance notifications" and with them turns off the pool's check that a pooled
            # socket is not already closed by the server, so the first calls after a Redis
            # restart would fail instead of reconnecting.
            "protocol": 2,
        }
        self.address = cfg.url  # host:port or a socket path; never holds credentials
        connection_class: type[AbstractConnection]
        if cfg.socket_type == "unix":
            if cfg.tls:
                raise BackendError("redis: REDIS_TLS is not supported with REDIS_SOCKET_TYPE=unix")
            connection_class = _UnixConnection
            kwargs["path"] = cfg.url
        else:
            host, port = _split_host_port(cfg.url)
            kwargs.update(host=host, port=port)
            connection_class = _TcpConnection
            if cfg.tls:
                connection_class = _TlsConnection
                kwargs.update(
                    ssl_cert_reqs="required",
                    ssl_ca_certs=cfg.tls_cacert or None,
                    ssl_certfile=cfg.tls_client_cert or None,
                    ssl_keyfile=cfg.tls_client_key or None,
                    # The chain is still verified against the CA; only the name check is skipped.
                    ssl_check_hostname=not cfg.tls_skip_hostname_verification,
                )
        self._description = (
            f"{cfg.socket_type}{'+tls' if cfg.tls else ''} {self.address}, "
            f"pool_size={max(cfg.pool_size, 1)}"
        )
        # Waiting for a free connection is bounded by the operation timeout, not by the pool.
        # A pool size of 0 would deadlock every call, so it means 1.
        pool = BlockingConnectionPool(
            max_connections=max(cfg.pool_size, 1),
            timeout=None,
            connection_class=connection_class,
            **kwargs,
        )
        self._pool = cast(_Pool, pool)

    def __repr__(self) -> str:
        return f"RedisStore({self._description})"

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        commands: list[_Command] = []
        for inc in increments:
            commands.append(("INCRBY", inc.key, inc.hits))
            commands.append(("EXPIRE", inc.key, inc.ttl))
        replies = await self._exchange(commands)
        return [self._as_int(reply) for reply in replies[::2]]

    async def get(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        (values,) = await self._exchange([("MGET", *keys)])
        if not isinstance(values, list) or len(values) != len(keys):
            raise BackendError(f"redis: unexpected reply to MGET from {self.address}")
        return [0 if value is None else self._as_int(value) for value in values]

    async def ping(self) -> None:
        await self._exchange([("PING",)])

    async def close(self) -> None:
        await self._pool.aclose()

    def pool_stats(self) -> dict[str, int]:
        """Open connections, connections ever opened, and those closed from this side."""
        total, closed = self._stats.total, self._stats.local_close
        return {"cx_active": total - closed, "cx_total": total, "cx_local_close": closed}

    async def _exchange(self, commands: Sequence[_Command]) -> list[Any]:
        """Write every command in one go and read every reply, on one pooled connection."""
        if not commands:
            return []
        try:
            async with asyncio.timeout(self._op_timeout):
                conn = await self._pool.get_connection()
                try:
                    replies = await self._send_and_read(conn, commands)
                except BaseException:
                    # Replies may still be on their way: the socket must never be reused.
                    await conn.disconnect(nowait=True)
                    raise
                finally:
                    await asyncio.shield(self._pool.release(conn))
        except TimeoutError:
            raise BackendError(
                f"redis: no answer from {self.address} within {self._op_timeout:g}s"
            ) from None
        except (RedisError, OSError, ValueError) as exc:
            raise self._backend_error(exc) from None
        first_error = next((r for r in replies if isinstance(r, ResponseError)), None)
        if first_error is not None:
            raise self._backend_error(first_error)
        return replies

    @staticmethod
    async def _send_and_read(conn: AbstractConnection, commands: Sequence[_Command]) -> list[Any]:
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # the reply was read whole; the socket stays in step
                replies.append(exc)
        return replies

    def _as_int(self, reply: Any) -> int:
        try:
            return int(reply)
        except (TypeError, ValueError):
            raise BackendError(
                f"redis: {self.address} returned {reply!r} where a counter was expected"
            ) from None

    def _backend_error(self, exc: BaseException) -> BackendError:
        """A BackendError whose text names the failure and never a credential.

        redis-py messages can quote command arguments (AUTH's) or connection parameters; the
        cause is dropped by the caller for the same reason.
        """
        text = str(exc) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        if self.address not in text:
            text = f"{text} ({self.address})"
        return BackendError(f"redis: {text}")


async def open_redis_store(
    cfg: RedisSettings,
    *,
    op_timeout: float,
    startup_initial_interval: float,
    startup_max_interval: float,
    startup_max_elapsed: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> RedisStore:
    """A RedisStore whose server has answered PING.

    Failed attempts are retried after ``startup_initial_interval``, doubling up to
    ``startup_max_interval``; after ``startup_max_elapsed`` seconds (0 = never) the last error is
    raised as BackendError. Elapsed time counts both the sleeps and the attempts, so an injected
    ``sleep`` makes the schedule exact in tests.
    """
    if startup_initial_interval <= 0:
        raise ValueError("startup_initial_interval must be positive")
    store = RedisStore(cfg, op_timeout=op_timeout)
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


async def open_store(settings: Settings, clock: Callable[[], float]) -> RedisStore:
    """The backend table's factory: REDIS_* settings, REDIS_OP_TIMEOUT and the startup backoff."""
    return await open_redis_store(
        settings.redis,
        op_timeout=settings.redis_op_timeout,
        startup_initial_interval=settings.redis_startup_initial_interval,
        startup_max_interval=settings.redis_startup_max_interval,
        startup_max_elapsed=settings.redis_startup_max_elapsed_time,
    )
