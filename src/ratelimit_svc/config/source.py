"""Config sources: where the running service's rules come from. A source reports every config it
loads, or the error that made it keep the last one, to a ``ConfigSink`` (the App), which swaps,
counts and logs them in one place. Sources: ``FileSource`` (files and their watcher), the xDS
client (config/xds.py) and, in a worker process, the link to the primary (workers/roles.py).
See docs/architecture.md (Config sources)."""

from __future__ import annotations

import contextlib
from typing import Protocol

from ratelimit_svc.config.files import RuntimeLocation, load_from_files
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.config.watch import ConfigWatcher
from ratelimit_svc.errors import ConfigError


class ConfigSink(Protocol):
    """What a source reports to (``App``)."""

    def loaded(self, config: RateLimitConfig, detail: str = "") -> None:
        """A new config was loaded and validated here: swap it in, count and log it."""
        ...

    def failed(self, error: ConfigError) -> None:
        """A load failed: keep the current config, count and log the error."""
        ...

    def empty(self, reason: str) -> None:
        """There is nothing to load (no config at all); the current state stays."""
        ...

    def adopted(self, config: RateLimitConfig | None) -> None:
        """A config loaded and counted elsewhere (the primary process): swap it in only."""
        ...


class ConfigSource(Protocol):
    async def start(self, sink: ConfigSink) -> None:
        """Report the first config (waiting for it where the source requires), then keep
        following changes in the background until ``close``."""
        ...

    async def close(self) -> None: ...


class FileSource:
    """CONFIG_TYPE=FILE: load the files at start and, with ``watch``, after every change."""

    def __init__(
        self,
        location: RuntimeLocation,
        *,
        watch: bool,
        watch_root: bool,
        merge_domains: bool,
        fixed_windows_only: str = "",
    ) -> None:
        self.location = location
        self.merge_domains = merge_domains
        self.fixed_windows_only = fixed_windows_only  # docs/algorithms.md
        self._watch = watch
        self._watch_root = watch_root
        self.watcher: ConfigWatcher | None = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self, sink: ConfigSink) -> None:
        self.load(sink)
        if self._watch:
            self.watcher = await self._stack.enter_async_context(
                ConfigWatcher(
                    self.location, watch_root=self._watch_root, reload=lambda: self.load(sink)
                )
            )

    def load(self, sink: ConfigSink) -> None:
        """Load the whole file config once and report the result."""
        try:
            config = load_from_files(
                self.location,
                merge_domains=self.merge_domains,
                fixed_windows_only=self.fixed_windows_only,
            )
        except ConfigError as exc:
            sink.failed(exc)
            return
        if config is None:
            sink.empty("RUNTIME_SUBDIRECTORY is empty: no rate limit configuration is loaded")
            return
        sink.loaded(config)

    async def close(self) -> None:
        await self._stack.aclose()
