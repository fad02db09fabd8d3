"""The composition root and lifecycle: settings → store → config → limiter → servers.

``async with App(settings) as app: await app.run()`` reads like the service's life: open the
backend (retrying as it defines), load the config, start listening, serve until a signal, then stop
listening (finishing in-flight RPCs) and close the backend. A second signal forces exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

from ratelimit_svc import backends
from ratelimit_svc.backends.latency import LatencyRecorder, TimedStore
from ratelimit_svc.config.build import fixed_windows_only
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.config.snapshot import encode, release
from ratelimit_svc.config.status import ConfigStatus
from ratelimit_svc.errors import ConfigError
from ratelimit_svc.limiter.hotkeys import HotKeys
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions, Request
from ratelimit_svc.limiter.peek import CounterView, peek
from ratelimit_svc.limiter.store import CounterStore
from ratelimit_svc.servers.health import Health, monitor_backend
from ratelimit_svc.service import RateLimitService, RequestLimits
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.stats.registry import (
    STAT_LOAD_ERROR,
    STAT_LOAD_SUCCESS,
    MemoryStats,
    local_cache_collector,
)
from ratelimit_svc.stats.reporter import StatsReporter, start_reporter

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from ratelimit_svc.config.source import ConfigSource
    from ratelimit_svc.config.xds import XdsConfigClient
    from ratelimit_svc.servers.console.model import Console
    from ratelimit_svc.servers.http_api import Listener
    from ratelimit_svc.tracing import Tracing

log = logging.getLogger(__name__)

# In-flight RPCs and HTTP requests get this long to finish once the listeners stop accepting.
STOP_GRACE_SECONDS = 5.0
# A signal repeated within this long counts as the same one, not as a forcing second signal.
DUPLICATE_SIGNAL_SECONDS = 1.0


class GrpcListener(Protocol):
    """What the app needs of the gRPC port, whichever transport serves it (docs/transports.md)."""

    async def set_serving(self, serving: bool) -> None: ...

    async def stop(self, grace: float | None) -> None: ...


# Starts the gRPC port for the service, healthy or not as ``serving`` says: grpc.aio's
# ``start_grpc_server`` here, the ASGI app inside pyvoy (workers/embedded.py).
GrpcStarter = Callable[[RateLimitService, Settings, bool], Awaitable[GrpcListener]]


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
        charge_only_when_admitted=settings.charge_only_when_admitted,
        ietf_headers=settings.ietf_ratelimit_headers_enabled,
    )


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class AppHook:
    """A role's additions to the App's lifecycle (workers/roles.py): passed in, never overridden.
    Every method is a no-op here; a hook defines the ones it needs."""

    async def started(self, app: App) -> None:
        """The listeners are up. ``app.defer`` registers what to run when operations close."""

    def config_changed(self, config: RateLimitConfig | None) -> None:
        """A config was swapped in (every process answers from the same snapshot)."""

    def stopping(self) -> None:
        """Shutdown has begun."""

    def status_requested(self) -> None:
        """SIGUSR1 reached this process (docs/reliability.md): its own line is logged already."""

    async def closed(self) -> None:
        """Everything has closed, the final stats flush included."""


async def _grpc_aio(service: RateLimitService, settings: Settings, serving: bool) -> GrpcListener:
    # Imported here: grpc is not loaded where it is not used (pyvoy's processes, the primary
    # without a gRPC port), about 10 MiB each (docs/performance.md (Memory)).
    from ratelimit_svc.servers.grpc_aio import start_grpc_server

    return await start_grpc_server(service, settings, serving=serving)


def _xds(source: ConfigSource) -> XdsConfigClient | None:
    """``source`` if it is the xDS client. config/xds.py (and grpc with it) is imported only when
    CONFIG_TYPE asks for xDS, so no instance can exist before it is."""
    module = sys.modules.get("ratelimit_svc.config.xds")
    if module is not None and isinstance(source, module.XdsConfigClient):
        return cast("XdsConfigClient", source)
    return None


def config_source(settings: Settings) -> ConfigSource:
    """The source CONFIG_TYPE names: files (watched when RUNTIME_SUBDIRECTORY is set) or xDS."""
    if settings.config_type == "GRPC_XDS_SOTW":
        from ratelimit_svc.config.xds import XdsConfigClient

        return XdsConfigClient(
            settings,
            wait_first=not settings.force_start_without_initial_config,
            max_message_bytes=settings.xds.max_msg_size_in_bytes,
        )
    # Imported here: a gRPC worker, whose configs come from the primary, loads no files.
    from ratelimit_svc.config.files import RuntimeLocation
    from ratelimit_svc.config.source import FileSource

    location = RuntimeLocation(
        settings.runtime_root,
        settings.runtime_subdirectory,
        settings.runtime_appdirectory,
        settings.runtime_ignoredotfiles,
        settings.runtime_ignore_patterns,
        settings.config_max_file_bytes,
    )
    return FileSource(
        location,
        watch=bool(settings.runtime_subdirectory),
        watch_root=settings.runtime_watch_root,
        merge_domains=settings.merge_domain_config,
        fixed_windows_only=fixed_windows_only(settings),
    )


class App:
    """One running service. ``config`` is swapped whole on reload; requests keep their snapshot.

    What differs between roles comes in as arguments: the config ``source``, the ``stats`` it
    records into, whether it serves the operator ports (HTTP, debug, stats sink) and ``hooks``.
    It is also the ``ConfigSink`` of its source: every load is swapped, counted and logged here.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        source: ConfigSource | None = None,
        stats: MemoryStats | None = None,
        operator_ports: bool = True,
        hooks: Sequence[AppHook] = (),
        grpc_server: GrpcStarter | None = None,
        clock: Callable[[], float] = time.time,
        span_exporter: SpanExporter | None = None,  # tests: spans in memory instead of OTLP
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.source = source if source is not None else config_source(settings)
        self.stats = stats if stats is not None else MemoryStats(max_keys=settings.stats_max_keys)
        self.operator_ports = operator_ports
        self.hooks = tuple(hooks)
        self.grpc_server: GrpcStarter = grpc_server or _grpc_aio
        self.reporter: StatsReporter | None = None
        self.tracing: Tracing | None = None
        self._span_exporter = span_exporter
        self.health = Health(require_config=settings.healthy_with_at_least_one_config_loaded)
        self._config: RateLimitConfig | None = None
        self._pickled: tuple[RateLimitConfig | None, bytes] | None = None  # see pickled_config
        self._releasing: set[asyncio.Task[None]] = set()
        self.store: CounterStore | None = None
        self.grpc: GrpcListener | None = None
        self.http: Listener | None = None
        self.debug: Listener | None = None
        # What the console shows (docs/console.md): load status, hot keys, backend latency, and
        # the other processes' reports (the primary's hook fills it, workers/roles.py).
        xds = _xds(self.source) is not None
        self.config_status = ConfigStatus(source="xds" if xds else "file", clock=clock)
        self.hot_keys = HotKeys()
        self.latency = LatencyRecorder()
        self.peer_reports: Mapping[int, Mapping[str, Any]] = {}
        self.console: Console | None = None
        self._operations = contextlib.AsyncExitStack()  # HTTP, debug, health, config source
        self._stop = asyncio.Event()
        self._created = time.monotonic()

    @property
    def config(self) -> RateLimitConfig | None:
        return self._config

    @config.setter
    def config(self, config: RateLimitConfig | None) -> None:
        """The one reference swap of a reload (any source); health follows it."""
        old, self._config = self._config, config
        if old is not None and old is not config:
            self._spawn_release(old)
        self.health.set_config_loaded(config is not None and bool(config.domains))
        for hook in self.hooks:
            hook.config_changed(config)

    def _spawn_release(self, old: RateLimitConfig) -> None:
        """Free the replaced config in steps (config/snapshot.py), from a task owned here."""
        with contextlib.suppress(RuntimeError):  # no running loop: nothing can stall
            task = asyncio.get_running_loop().create_task(release(old), name="release-config")
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def pickled_config(self) -> bytes:
        """The current config encoded (config/snapshot.py), as worker processes are sent it: the
        load process's own encoding after a file load, else encoded in a thread."""
        config = self._config
        if self._pickled is None or self._pickled[0] is not config:
            encoded = await asyncio.to_thread(encode, config)
            self._pickled = (config, encoded)
            return encoded
        return self._pickled[1]

    # -- the ConfigSink of config/source.py -------------------------------------------------------

    def loaded(
        self, config: RateLimitConfig, detail: str = "", *, pickled: bytes | None = None
    ) -> None:
        if pickled is not None and self.hooks:  # worker processes are sent this very pickle
            self._pickled = (config, pickled)
        self.config = config
        source = _xds(self.source)
        if source is not None:
            self.config_status.loaded(version=source.version, nonce=source.nonce)
        else:
            self.config_status.loaded()
        self.stats.add(STAT_LOAD_SUCCESS)
        log.info("Successfully loaded new configuration%s", detail)

    def failed(self, error: ConfigError) -> None:
        self.config_status.failed(str(error))
        self.stats.add(STAT_LOAD_ERROR)
        log.error("Error loading new configuration: %s", error)

    def empty(self, reason: str) -> None:
        log.warning("%s", reason)

    def adopted(self, config: RateLimitConfig | None) -> None:
        self.config = config

    # -- lifecycle -------------------------------------------------------------------------------

    def defer(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` when operations close: after the gRPC listener has stopped, before
        the store closes and the final stats flush."""
        self._operations.push_async_callback(callback)

    async def __aenter__(self) -> App:
        settings = self.settings
        self.store = await backends.open_store(settings, self.clock, self.stats.scope("ratelimit"))
        try:
            self._operations.push_async_callback(self.source.close)
            await self.source.start(self)
            self.limiter = limiter = Limiter(
                store=self._traced_store(TimedStore(self.store, self.latency)),
                stats=self.stats,
                options=limiter_options(settings),
                clock=self.clock,
                hot_keys=self.hot_keys,
            )
            limits = RequestLimits(
                settings.max_descriptors_per_request,
                settings.max_entries_per_descriptor,
                settings.max_value_bytes,
            )
            self.service = RateLimitService(
                limiter, lambda: self.config, self.stats, limits, tracer=self.tracing
            )
            await self._start_stats(limiter)
            self.grpc = await self.grpc_server(self.service, settings, self.health.healthy)
            await self._start_operations()
            for hook in self.hooks:
                await hook.started(self)
        except BaseException:
            await self._operations.aclose()
            if self.grpc is not None:
                await self.grpc.stop(grace=None)
            await self.store.close()
            await self._close_telemetry()
            raise
        return self

    async def _start_operations(self) -> None:
        """Health publishing and backend pings; the HTTP and debug ports when this process
        serves the operator ports."""
        assert self.store is not None and self.grpc is not None
        settings, ops = self.settings, self._operations
        self.health.observe(self.grpc.set_serving)
        spawn = asyncio.get_running_loop().create_task
        for task in (
            spawn(self.health.run(), name="health-publish"),
            spawn(
                monitor_backend(self.store, self.health, ping_timeout=settings.redis_op_timeout),
                name="health-backend-ping",
            ),
        ):
            ops.push_async_callback(cancel_and_wait, task)
        if not self.operator_ports:
            return
        # Imported here: aiohttp and the console stay out of gRPC workers (docs/performance.md
        # (Memory)).
        from ratelimit_svc.servers.console.model import Console
        from ratelimit_svc.servers.debug import start_debug_server
        from ratelimit_svc.servers.http_api import start_http_server

        self.http = await start_http_server(
            self.service, self.health, settings.host, settings.port,
            idle_timeout=settings.http_idle_timeout,
        )  # fmt: skip
        ops.push_async_callback(self.http.close)
        self.console = console = Console(
            settings,
            config=lambda: self.config,
            status=self.config_status,
            stats=self.stats,
            limiter=self.service.limiter,
            store=self.store,
            health=self.health,
            recorder=self.latency,
            request_limits=self.service.limits,
            workers=lambda: self.peer_reports,
            clock=self.clock,
        )
        console.start()
        ops.push_async_callback(console.close)
        limiter = self.limiter

        async def peek_now(request: Request) -> list[CounterView]:
            return await peek(limiter, self.config, request)

        self.debug = await start_debug_server(
            settings, lambda: self.config, self.stats.snapshot, console, peek_now
        )
        ops.push_async_callback(self.debug.close)

    # -- stats and tracing ---------------------------------------------------------------------

    def _traced_store(self, store: CounterStore) -> CounterStore:
        """The store the limiter uses: each round trip a span when TRACING_ENABLED."""
        if self.settings.tracing.enabled and self.tracing is None:
            from ratelimit_svc.tracing import (
                Tracing,  # imported only now: no OpenTelemetry when tracing is off
            )

            self.tracing = Tracing(
                self.settings.tracing, self.settings.backend_type, self._span_exporter
            )
        return store if self.tracing is None else self.tracing.wrap_store(store)

    async def _start_stats(self, limiter: Limiter) -> None:
        """The local cache's stats and, on the operator ports' process, the configured sink
        (stores report their own through the scope they were opened with)."""
        if limiter.local_cache is not None:
            self.stats.add_collector(local_cache_collector(limiter.local_cache))
        if self.operator_ports:
            self.reporter = await start_reporter(self.settings.stats, self.stats)

    async def _close_telemetry(self) -> None:
        reporter, self.reporter = self.reporter, None
        tracing, self.tracing = self.tracing, None
        try:
            if reporter is not None:
                await reporter.close()
        finally:
            if tracing is not None:
                await tracing.shutdown()

    async def run(self) -> None:
        await self._stop.wait()

    def status(self) -> str:
        """This process in a few words, for SIGUSR1's line (docs/reliability.md)."""
        config = self.config
        return "{}, {}, up {}s".format(
            "healthy" if self.health.healthy else "not healthy",
            "no config" if config is None else f"{len(config.domains)} domains",
            int(time.monotonic() - self._created),
        )

    def log_status(self) -> None:
        log.warning("status (SIGUSR1): pid %d, %s", os.getpid(), self.status())

    def stop(self) -> None:
        """Begin shutdown (SIGTERM): unhealthy at once on both health surfaces."""
        self.health.start_shutdown()
        self._stop.set()
        for hook in self.hooks:
            hook.stopping()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._shut_down()
        finally:
            for hook in self.hooks:
                await hook.closed()

    async def _shut_down(self) -> None:
        # Unhealthy first, then give load balancers SHUTDOWN_DRAIN_SECONDS to notice while every
        # request is still answered; only then stop accepting and finish what is in flight.
        self.health.start_shutdown()
        await self.health.publish()
        drain = self.settings.shutdown_drain_seconds
        if drain > 0:
            log.warning("shutting down: draining for %gs before closing listeners", drain)
            await asyncio.sleep(drain)
        try:
            if self.grpc is not None:
                await self.grpc.stop(grace=STOP_GRACE_SECONDS)
        finally:
            try:
                await self._operations.aclose()  # the source, debug, HTTP (in-flight finish)
            finally:
                try:
                    if self.store is not None:
                        await self.store.close()
                finally:
                    await self._close_telemetry()  # the final stats flush, buffered spans


async def serve(settings: Settings, app_factory: Callable[[Settings], App] = App) -> None:
    """Run until SIGTERM/SIGINT/SIGHUP, then shut down gracefully (exit 0); a second signal
    forces exit. SIGUSR1 logs a status line, SIGUSR2 is ignored (docs/reliability.md).

    The handlers are installed before startup: a signal while the backend is still being waited
    for cancels the startup, and one that arrives during it is never the default (kill) action.
    """
    loop = asyncio.get_running_loop()
    app = app_factory(settings)  # App, or a worker process's variant (workers.py)
    starting = asyncio.current_task()
    signals_seen = 0
    first_signal_at = 0.0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen, first_signal_at
        signals_seen += 1
        if signals_seen > 1:
            # The same signal often arrives twice at once (a process group kill plus a parent
            # such as make forwarding it): only a deliberate second signal forces the exit.
            if time.monotonic() - first_signal_at < DUPLICATE_SIGNAL_SECONDS:
                return
            log.warning("second signal: exiting now")
            os._exit(1)
        first_signal_at = time.monotonic()
        log.warning("signal received: shutting down (%s)", sig.name)
        app.stop()
        if starting is not None:
            starting.cancel()

    def on_status() -> None:
        app.log_status()
        for hook in app.hooks:
            hook.status_requested()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGUSR1, on_status)
    loop.add_signal_handler(signal.SIGUSR2, log.debug, "SIGUSR2 ignored")
    try:
        async with app:
            starting = None  # started: from now on the signal drains instead of cancelling
            log.info("started (pid %d)", os.getpid())
            # What startup built lives as long as the process: keep the collector from scanning
            # it again, so a full collection never pauses requests for milliseconds.
            gc.freeze()
            await app.run()
    except asyncio.CancelledError:
        if not signals_seen:
            raise
