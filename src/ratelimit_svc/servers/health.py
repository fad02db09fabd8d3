"""The service's one health state (backend answering, no shutdown begun, a config loaded when
required), which HTTP ``/healthcheck`` reads and the gRPC health service is told of
(docs/operations.md (Health)).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)

PING_INTERVAL_SECONDS = 1.0

Observer = Callable[[bool], Awaitable[None]]


class Pingable(Protocol):
    async def ping(self) -> None: ...


class Health:
    """Backend reachability, shutdown and config-loaded, combined into one ``healthy`` flag."""

    def __init__(self, *, require_config: bool = False) -> None:
        self.require_config = require_config
        self.backend_reachable = True  # the store is opened only after its startup PING answers
        self.shutting_down = False
        self.config_loaded = False  # a config with at least one domain
        self._observers: list[Observer] = []
        self._changed = asyncio.Event()
        self._published: bool | None = None

    @property
    def healthy(self) -> bool:
        if self.shutting_down or not self.backend_reachable:
            return False
        return self.config_loaded or not self.require_config

    def set_backend_reachable(self, reachable: bool) -> None:
        self.backend_reachable = reachable
        self._changed.set()

    def set_config_loaded(self, loaded: bool) -> None:
        self.config_loaded = loaded
        self._changed.set()

    def start_shutdown(self) -> None:
        """Unhealthy from now on, whatever else happens (SIGTERM)."""
        self.shutting_down = True
        self._changed.set()

    def observe(self, observer: Observer) -> None:
        """Call ``observer(healthy)`` now (on the next ``publish``) and on every change."""
        self._observers.append(observer)
        self._published = None
        self._changed.set()

    async def publish(self) -> None:
        """Tell every observer the current state, if it changed since the last publish."""
        self._changed.clear()
        healthy = self.healthy
        if healthy == self._published:
            return
        self._published = healthy
        for observer in self._observers:
            await observer(healthy)

    async def run(self) -> None:
        """Publish every change until cancelled."""
        while True:
            await self._changed.wait()
            await self.publish()


async def monitor_backend(
    store: Pingable,
    health: Health,
    *,
    ping_timeout: float,
    interval: float = PING_INTERVAL_SECONDS,
) -> None:
    """PING the backend every ``interval`` seconds until cancelled; record whether it answered."""
    while True:
        await asyncio.sleep(interval)
        try:
            async with asyncio.timeout(ping_timeout):
                await store.ping()
        except Exception as exc:  # BackendError, TimeoutError, or a bug: never stop pinging
            if health.backend_reachable:
                reason = str(exc) or f"no answer to PING within {ping_timeout:g}s"
                log.error("backend health check failed, reporting unhealthy: %s", reason)
            health.set_backend_reachable(False)
        else:
            if not health.backend_reachable:
                log.warning("backend health check passed again, reporting healthy")
            health.set_backend_reachable(True)
