"""Counters in the Redis master that Sentinel names (REDIS_TYPE=sentinel): ``RedisStore``'s
exchange over a ``client.ServerClient`` that asks the sentinels for the master's address at every
connect and is reset on ``+switch-master`` (docs/backends.md (Redis Sentinel)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ratelimit_svc.backends.redis.client import Endpoint, ServerClient
from ratelimit_svc.backends.redis.connection import (
    CommandStore,
    Redactor,
    endpoint,
    split_host_port,
)
from ratelimit_svc.backends.redis.protocol import Command, PoolStats, ReplyError
from ratelimit_svc.errors import BackendError

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import RedisSettings

log = logging.getLogger(__name__)

SWITCH_MASTER = "+switch-master"
WATCH_RETRY_SECONDS = 1.0


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
        self._cfg = cfg
        self._redactor = Redactor(cfg.auth, cfg.sentinel_auth)
        self._sentinels = [
            ServerClient(
                endpoint(cfg, host=host, port=port, auth=cfg.sentinel_auth),
                op_timeout=op_timeout,
                redact=self._redactor,
            )
            for host, port in sentinels
        ]
        self.address = f"{self.master_name}@{','.join(f'{h}:{p}' for h, p in sentinels)}"
        self._stats = PoolStats()
        self._server = ServerClient(
            self._discover,
            op_timeout=op_timeout,
            redact=self._redactor,
            stats=self._stats,
            address=self.address,
        )
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        self.switches_seen = 0
        self._description = f"sentinel{'+tls' if cfg.tls else ''} {self.address}"

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
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await super().close()
        await self._server.close()
        await asyncio.gather(*(sentinel.close() for sentinel in self._sentinels))

    def pool_stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    async def _discover(self) -> Endpoint:
        """The current master's address from the first sentinel that knows it."""
        errors: list[str] = []
        for index, sentinel in enumerate(self._sentinels):
            try:
                (reply,) = await sentinel.exchange(
                    [("SENTINEL", "get-master-addr-by-name", self.master_name)]
                )
            except BackendError as exc:
                errors.append(f"{sentinel.address}: {str(exc).removeprefix('redis: ')}")
                continue
            if isinstance(reply, ReplyError):
                errors.append(f"{sentinel.address}: {self._redactor(str(reply))}")
                continue
            if not isinstance(reply, list) or len(reply) != 2:
                errors.append(f"{sentinel.address}: knows no master {self.master_name!r}")
                continue
            # The sentinel that answered goes first next time.
            self._sentinels[0], self._sentinels[index] = sentinel, self._sentinels[0]
            host = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            return endpoint(self._cfg, host=host, port=int(reply[1]))
        raise BackendError(
            f"redis: no master found for {self.master_name!r} "
            f"({'; '.join(errors) or 'no sentinels'})"
        )

    async def _watch_switches(self) -> None:
        """Follow ``+switch-master`` on the first sentinel that takes the subscription."""
        while True:
            for sentinel in list(self._sentinels):
                watcher = ServerClient(
                    sentinel.endpoint,
                    op_timeout=self._op_timeout,
                    redact=self._redactor,
                    on_push=self._on_push,
                )
                # Closed after each outcome, not in a finally: compiled code must not await
                # there (docs/performance.md, Compiled modules).
                try:
                    await watcher.exchange([("SUBSCRIBE", SWITCH_MASTER)])
                    connection = watcher.connection
                    if connection is not None:
                        await connection.lost
                except BackendError as exc:
                    log.debug("redis sentinel: %s subscription lost: %s", SWITCH_MASTER, exc)
                except BaseException:  # cancelled: the store is closing
                    await watcher.close()
                    raise
                await watcher.close()
            await asyncio.sleep(WATCH_RETRY_SECONDS)

    def _on_push(self, message: Any) -> None:
        # [b"message", b"+switch-master", b"<master name> <old ip> <old port> <new ip> <new port>"]
        if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
            return
        fields = message[2].decode(errors="replace").split()
        if not fields or fields[0] != self.master_name:
            return
        self.switches_seen += 1
        log.info("redis sentinel: master %s moved to %s", self.master_name, " ".join(fields[3:5]))
        # Calls in flight on the old master fail (their writes would be lost anyway).
        self._server.reset(f"master {self.master_name} moved: reconnecting")
