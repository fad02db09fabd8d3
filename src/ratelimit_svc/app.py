"""The composition root and lifecycle: settings → store → config → limiter → servers.

``async with App(settings) as app: await app.run()`` reads like the service's life: open the
backend (retrying as it defines), load the config, start listening, serve until a signal, then stop
listening (finishing in-flight RPCs) and close the backend. A second signal forces exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import TracebackType

from . import backends
from .config import RateLimitConfig
from .errors import ConfigError, RateLimitSvcError, SettingsError
from .grpc_server import GrpcServer, start_grpc_server
from .limiter import CounterStore, Limiter, LimiterOptions
from .runtime import RuntimeLocation, load_from_files
from .service import RateLimitService
from .settings import Settings
from .stats import MemoryStats

log = logging.getLogger(__name__)

STAT_LOAD_SUCCESS = "ratelimit.service.config_load_success"
STAT_LOAD_ERROR = "ratelimit.service.config_load_error"


def limiter_options(settings: Settings) -> LimiterOptions:
    headers = None
    if settings.limit_response_headers_enabled:
        headers = (
            settings.limit_limit_header,
            settings.limit_remaining_header,
            settings.limit_reset_header,
        )
    return LimiterOptions(
        near_limit_ratio=settings.near_limit_ratio,
        expiration_jitter_max_seconds=settings.expiration_jitter_max_seconds,
        cache_key_prefix=settings.cache_key_prefix,
        local_cache_size_in_bytes=settings.local_cache_size_in_bytes,
        stop_cache_key_increment_when_overlimit=settings.stop_cache_key_increment_when_overlimit,
        shadow_mode=settings.shadow_mode,
        quota_mode=settings.quota_mode,
        response_headers=headers,
        dynamic_metadata=settings.response_dynamic_metadata,
    )


class App:
    """One running service. ``config`` is swapped whole on reload; requests keep their snapshot."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.stats = MemoryStats()
        self.config: RateLimitConfig | None = None
        self.store: CounterStore | None = None
        self.grpc: GrpcServer | None = None
        self._stop = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> App:
        settings = self.settings
        self.store = await backends.open_store(settings, self.clock)
        try:
            self.reload()
            limiter = Limiter(
                store=self.store,
                stats=self.stats,
                options=limiter_options(settings),
                clock=self.clock,
            )
            self.service = RateLimitService(limiter, lambda: self.config, self.stats)
            self.grpc = await start_grpc_server(self.service, settings)
        except BaseException:
            await self.store.close()
            raise
        return self

    async def run(self) -> None:
        await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.grpc is not None:
            await self.grpc.set_serving(False)
            await self.grpc.stop(grace=5.0)
        if self.store is not None:
            await self.store.close()

    # -- config ----------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the whole file config; on success swap it in, on failure keep the old one."""
        s = self.settings
        location = RuntimeLocation(
            s.runtime_root, s.runtime_subdirectory, s.runtime_appdirectory,
            s.runtime_ignoredotfiles,
        )
        try:
            config = load_from_files(location, merge_domains=s.merge_domain_config)
        except ConfigError as exc:
            self.stats.add(STAT_LOAD_ERROR)
            log.error("Error loading new configuration: %s", exc)
            return False
        if config is None:
            log.warning("RUNTIME_SUBDIRECTORY is empty: no rate limit configuration is loaded")
            return False
        self.config = config
        self.stats.add(STAT_LOAD_SUCCESS)
        log.info("Successfully loaded new configuration")
        return True


def configure_logging(settings: Settings) -> None:
    level = {"TRACE": "DEBUG", "WARN": "WARNING", "FATAL": "CRITICAL", "PANIC": "CRITICAL"}.get(
        settings.log_level, settings.log_level
    )
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    async with App(settings) as app:
        signals_seen = 0

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                log.warning("second signal: exiting now")
                os._exit(1)
            log.warning("signal received: shutting down")
            app.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await app.run()


def main() -> None:
    """Console script ``ratelimit``: configured only by environment variables."""
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"ratelimit: {exc}", file=sys.stderr)
        sys.exit(1)
    configure_logging(settings)
    try:
        asyncio.run(serve(settings))
    except RateLimitSvcError as exc:
        log.error("%s", exc)
        sys.exit(1)
