"""Counters in the Redis master that Sentinel names (REDIS_TYPE=sentinel): ``RedisStore``'s
exchange, with connections sent to the current master and dropped on ``+switch-master``
(docs/backends.md (Redis Sentinel)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ratelimit_svc.backends.redis.connection import (
    Command,
    CommandStore,
    CountedConnection,
    PoolStats,
    Redactor,
    ServerPool,
    connection_options,
    split_auth,
    split_host_port,
    tls_options,
)
from ratelimit_svc.errors import BackendError

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import RedisSettings

log = logging.getLogger(__name__)

SWITCH_MASTER = "+switch-master"
WATCH_RETRY_SECONDS = 1.0


class _SentinelConnection(CountedConnection, SentinelManagedConnection):
    pass


class _SentinelTlsConnection(CountedConnection, SentinelManagedSSLConnection):
    pass


class _Sentinel(Sentinel):
    """redis-py's Sentinel with failures that name each sentinel and its error briefly (its own
    message embeds the whole client's repr)."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[str] = []
        for index, sentinel in enumerate(self.sentinels):
            kwargs = sentinel.connection_pool.connection_kwargs
            where = f"{kwargs.get('host')}:{kwargs.get('port')}"
            try:
                masters = await cast(Any, sentinel).sentinel_masters()
            except (RedisError, OSError) as exc:
                errors.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                # The sentinel that answered goes first next time.
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                return str(state["ip"]), int(state["port"])
            errors.append(f"{where}: knows no healthy master {service_name!r}")
        raise MasterNotFoundError(
            f"no master found for {service_name!r} ({'; '.join(errors) or 'no sentinels'})"
        )


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):  # type: ignore[type-arg]
    """Sentinel's master-following pool, waiting for a free connection like RedisStore's.

    (Called through ``Any``: the types-redis stubs predate redis-py 8's signatures.)
    """


def parse_sentinel_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``mastername,host:port,...`` → (master name, sentinel addresses)."""
    name, *sentinels = [part.strip() for part in url.split(",")]
    if not name or not sentinels:
        raise BackendError(
            f"redis: invalid REDIS_URL {url!r} for REDIS_TYPE=sentinel: expected master name and "
            "a list of urls for the sentinels, in the format: "
            "<redis master name>,<sentinel1>,...,<sentineln>"
        )
    return name, [split_host_port(s) for s in sentinels]


class SentinelStore(CommandStore):
    """Counters in the master of a Sentinel-managed Redis (REDIS_TYPE=sentinel)."""

    def __init__(self, cfg: RedisSettings, *, op_timeout: float) -> None:
        super().__init__(
            op_timeout=op_timeout,
            pipeline_window=cfg.pipeline_window,
            pipeline_limit=cfg.pipeline_limit,
        )
        self.master_name, sentinels = parse_sentinel_url(cfg.url)
        self._redactor = Redactor(cfg.auth, cfg.sentinel_auth)
        self._stats = PoolStats()
        _, kwargs = connection_options(
            cfg, op_timeout=op_timeout, pool_stats=self._stats, tcp=True
        )
        sentinel_user, sentinel_password = split_auth(cfg.sentinel_auth)
        sentinel_kwargs: dict[str, Any] = {
            "username": sentinel_user,
            "password": sentinel_password,
            "socket_timeout": op_timeout,
            "socket_connect_timeout": op_timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
        }
        if cfg.tls:
            sentinel_kwargs.update(ssl=True, **tls_options(cfg))
        self._sentinel = _Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
        pool = cast(Any, _BlockingSentinelPool)(
            self.master_name,
            self._sentinel,
            connection_class=_SentinelTlsConnection if cfg.tls else _SentinelConnection,
            max_connections=max(cfg.pool_size, 1),
            timeout=None,
            **kwargs,
        )
        self.address = f"{self.master_name}@{','.join(f'{h}:{p}' for h, p in sentinels)}"
        self._pool = pool
        self._server = ServerPool(self.address, pool, redact=self._redactor)
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        self.switches_seen = 0
        self._description = (
            f"sentinel{'+tls' if cfg.tls else ''} {self.address}, pool_size={max(cfg.pool_size, 1)}"
        )

    def __repr__(self) -> str:
        return f"SentinelStore({self._description})"

    def _redact(self, text: str) -> str:
        return self._redactor(text)

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        if self._watcher is None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_switches())
        return await self._server.exchange(commands)

    async def close(self) -> None:
        self._closed = True
        try:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
            await super().close()
            await self._server.close()
        finally:
            await cast(Any, self._sentinel).aclose()

    async def _watch_switches(self) -> None:
        """Follow ``+switch-master`` on the first sentinel that takes the subscription."""
        while True:
            for sentinel in list(self._sentinel.sentinels):
                pubsub: Any = sentinel.pubsub()
                try:
                    await pubsub.subscribe(SWITCH_MASTER)
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and message.get("type") == "message":
                            await self._on_switch(message["data"])
                except (RedisError, OSError) as exc:
                    log.debug("redis sentinel: %s subscription lost: %s", SWITCH_MASTER, exc)
                finally:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()
            await asyncio.sleep(WATCH_RETRY_SECONDS)

    async def _on_switch(self, data: bytes | str) -> None:
        # "<master name> <old ip> <old port> <new ip> <new port>"
        fields = (data.decode() if isinstance(data, bytes) else data).split()
        if not fields or fields[0] != self.master_name:
            return
        self.switches_seen += 1
        log.info("redis sentinel: master %s moved to %s", self.master_name, " ".join(fields[3:5]))
        # Calls in flight on the old master fail (their writes would be lost anyway).
        await cast(Any, self._pool).disconnect(inuse_connections=True)

    def pool_stats(self) -> dict[str, int]:
        return self._stats.as_dict()
