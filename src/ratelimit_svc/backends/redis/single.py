"""The store for REDIS_TYPE=single: one server, reached through one ``client.ServerClient``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ratelimit_svc.backends.redis.client import ServerClient
from ratelimit_svc.backends.redis.connection import (
    CommandStore,
    Redactor,
    endpoint,
    split_host_port,
)
from ratelimit_svc.backends.redis.protocol import Command
from ratelimit_svc.errors import BackendError

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import RedisSettings


class RedisStore(CommandStore):
    """Counters in one Redis (REDIS_TYPE=single). The socket opens lazily; see
    ``open_redis_store``."""

    def __init__(self, cfg: RedisSettings, *, op_timeout: float) -> None:
        if cfg.type != "single":
            raise BackendError(f"redis: RedisStore is for REDIS_TYPE=single, not '{cfg.type}'")
        super().__init__(
            op_timeout=op_timeout,
            pipeline_window=cfg.pipeline_window,
            pipeline_limit=cfg.pipeline_limit,
        )
        self._redactor = Redactor(cfg.auth)
        if cfg.socket_type == "unix":
            target = endpoint(cfg, path=cfg.url)
        else:
            host, port = split_host_port(cfg.url)
            target = endpoint(cfg, host=host, port=port)
        self.address = cfg.url
        self._server = ServerClient(
            target, op_timeout=op_timeout, redact=self._redactor, address=cfg.url
        )
        self._description = f"{cfg.socket_type}{'+tls' if cfg.tls else ''} {self.address}" + (
            f"/{cfg.db}" if cfg.db else ""
        )

    def __repr__(self) -> str:
        return f"RedisStore({self._description})"

    def _redact(self, text: str) -> str:
        return self._redactor(text)

    def _send(self, commands: Sequence[Command]) -> Awaitable[list[Any]]:
        return self._server.exchange(commands)

    def _packed_sender(self) -> Callable[[bytes, int], Awaitable[list[Any]]]:
        return self._server.exchange_packed

    async def close(self) -> None:
        await super().close()
        await self._server.close()

    def pool_stats(self) -> dict[str, int]:
        """Open connections, connections ever opened, and those closed from this side."""
        return self._server.stats.as_dict()
