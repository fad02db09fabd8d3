"""Config sources: where the running service's rules come from. A source reports every config it
loads, or the error that made it keep the last one, to a ``ConfigSink`` (the App), which swaps,
counts and logs them in one place. Sources: ``FileSource`` (files and their watcher), the xDS
client (config/xds.py) and, in a worker process, the link to the primary (workers/roles.py).
See docs/architecture.md (Config sources)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Protocol

from ratelimit_svc.config.files import RuntimeLocation
from ratelimit_svc.config.load_process import load_in_child
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.config.watch import ConfigWatcher
from ratelimit_svc.errors import ConfigError

log = logging.getLogger(__name__)


class ConfigSink(Protocol):
    """What a source reports to (``App``)."""

    def loaded(
        self, config: RateLimitConfig, detail: str = "", *, pickled: bytes | None = None
    ) -> None:
        """A new config was loaded and validated here: swap it in, count and log it
        (``pickled``: the same config encoded by config/snapshot.py, when the source has it)."""
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
        await self.load(sink)
        if self._watch:
            self.watcher = await self._stack.enter_async_context(
                ConfigWatcher(
                    self.location, watch_root=self._watch_root, reload=lambda: self.load(sink)
                )
            )

    async def load(self, sink: ConfigSink) -> None:
        """Load the whole file config once, off the event loop (config/load_process.py), and
        report the result."""
        started = time.monotonic()
        try:
            loaded = await load_in_child(
                self.location,
                merge_domains=self.merge_domains,
                fixed_windows_only=self.fixed_windows_only,
            )
        except ConfigError as exc:
            sink.failed(exc)
            return
        if loaded is None:
            sink.empty("RUNTIME_SUBDIRECTORY is empty: no rate limit configuration is loaded")
            return
        log.info(
            "config loaded in %.3fs: %d domains, %d bytes encoded",
            time.monotonic() - started, len(loaded.config.domains), len(loaded.pickled),
        )  # fmt: skip
        sink.loaded(loaded.config, pickled=loaded.pickled)

    async def close(self) -> None:
        await self._stack.aclose()
