"""The two roles of a multi-process service (WORKERS > 1), built on ``App``: the primary (the
whole service, whose stats also sum the workers' and whose configs reach them) and a gRPC worker
(configs from the primary, stats to it). ``run_processes`` starts one process or a primary and its
pool."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from ratelimit_svc.app import (
    STOP_GRACE_SECONDS,
    App,
    AppHook,
    GrpcListener,
    GrpcStarter,
    cancel_and_wait,
    serve,
)
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.config.snapshot import decode
from ratelimit_svc.logsetup import configure_logging
from ratelimit_svc.servers import pyvoy
from ratelimit_svc.servers.console.summary import process_summary
from ratelimit_svc.service import RateLimitService
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.stats.registry import MemoryStats
from ratelimit_svc.workers.aggregation import AggregateStats, Report
from ratelimit_svc.workers.supervisor import Link, WorkerPool, reserve_port, run_loop

if TYPE_CHECKING:
    from ratelimit_svc.config.source import ConfigSink

log = logging.getLogger(__name__)



REPORT_INTERVAL = 1.0  # seconds between a worker's stats reports to the primary


def run_processes(settings: Settings, env: Mapping[str, str], count: int, on_pyvoy: bool) -> None:
    """Everything but a lone pyvoy worker (workers/launch.py): one process serving it all, or a
    primary and its ``count`` workers (``env`` rebuilds the settings in each worker, the
    environment being the one place settings come from)."""
    if count == 1:
        run_loop(serve(settings))
        return
    reservation = reserve_port(settings.grpc_host, settings.grpc_port)
    try:
        settings = replace(settings, workers=count, grpc_port=reservation.getsockname()[1])
        if on_pyvoy:
            # Every worker is an Envoy serving gRPC; this process, the primary, serves the rest.
            pool = WorkerPool(
                settings, dict(env), count, spawn=pyvoy.EnvoyWorker.spawn,
                stop_grace=STOP_GRACE_SECONDS,
            )  # fmt: skip
            run_loop(serve(settings, app_factory=lambda s: primary_app(s, pool, grpc=False)))
            return
        pool = WorkerPool(
            settings, dict(env), count - 1, target=worker_main, stop_grace=STOP_GRACE_SECONDS
        )
        pool.start()  # before this process has any gRPC object (or even an event loop)
        run_loop(serve(settings, app_factory=lambda s: primary_app(s, pool)))
    finally:
        reservation.close()


# -- the primary ----------------------------------------------------------------------------------


def primary_app(settings: Settings, pool: WorkerPool, *, grpc: bool = True) -> App:
    """The process that was started: the whole App (gRPC included, unless only the workers
    serve it), whose stats also sum the workers' (bounded by STATS_MAX_KEYS like any App's) and
    whose configs reach them; stopping it stops them."""
    stats = AggregateStats(max_keys=settings.stats_max_keys)
    hook = _PrimaryHook(pool, stats, start_pool=not grpc)
    return App(settings, stats=stats, hooks=[hook], grpc_server=None if grpc else _no_grpc)


class NoGrpc:
    """The primary's gRPC port when only the workers serve it (pyvoy)."""

    async def set_serving(self, serving: bool) -> None:
        pass

    async def stop(self, grace: float | None) -> None:
        pass


async def _no_grpc(service: RateLimitService, settings: Settings, serving: bool) -> GrpcListener:
    return NoGrpc()


class _PrimaryHook(AppHook):
    def __init__(self, pool: WorkerPool, stats: AggregateStats, *, start_pool: bool) -> None:
        self.pool = pool
        self.stats = stats
        self.start_pool = start_pool

    async def started(self, app: App) -> None:
        if self.start_pool:  # Envoy workers are spawned, not forked: they may start this late
            self.pool.start()
        self.pool.attach(app.pickled_config, self.stats)
        app.peer_reports = self.pool.console_reports  # the console's line per worker
        # After the primary's own listeners stopped, before the store and the final stats flush
        # (so the workers' last reports are in it).
        app.defer(self.pool.wait_stopped)

    def config_changed(self, config: RateLimitConfig | None) -> None:
        self.pool.publish_config(config)

    def stopping(self) -> None:
        self.pool.stop()

    def status_requested(self) -> None:
        # Envoy workers run in sessions of their own, out of reach of a signal to our process
        # group: they are asked (forked grpcio workers got the group's signal themselves).
        if self.pool.only_workers_serve:
            self.pool.tell_all(("status",))


# -- a worker -------------------------------------------------------------------------------------


def worker_main(
    env: dict[str, str], count: int, port: int, index: int, sock: socket.socket
) -> None:
    """A worker process: the primary's settings (same environment), one shared port, no sink."""
    settings = Settings.from_env(env)
    settings = replace(
        settings,
        workers=count,
        grpc_port=port,
        stats=replace(settings.stats, disable_stats=True),
    )
    configure_logging(settings)
    try:
        run_loop(_serve_worker(settings, index, sock))
    except Exception:
        log.exception("gRPC worker %d failed", index)
        sys.exit(1)


async def _serve_worker(settings: Settings, index: int, sock: socket.socket) -> None:
    link = await Link.open(sock)
    message = await link.receive()
    if message is None or message[0] != "config":
        return  # the primary is gone before it sent anything
    config = await decode(message[1])
    await serve(settings, app_factory=lambda s: worker_app(s, link, config))


def worker_app(
    settings: Settings,
    link: Link,
    config: RateLimitConfig | None,
    *,
    grpc_server: GrpcStarter | None = None,
    listening: Callable[[], Awaitable[object]] | None = None,
) -> App:
    """A gRPC worker: App's store, limiter, service and gRPC listener; no HTTP, debug port or
    sink (the primary has them). Configs come from the primary, stats go to it, and it drains
    when the primary says so or goes away. It tells the primary it is ready once started, or,
    given ``listening`` (Envoy's listener is bound only after the app started), once that
    returns."""
    report = Report()
    stats = MemoryStats(max_keys=settings.stats_max_keys)
    stats.sink = report
    primary = PrimaryLink(link, config, stats, report, listening)
    return App(
        settings, source=primary, stats=stats, operator_ports=False, hooks=[primary],
        grpc_server=grpc_server,
    )  # fmt: skip


class PrimaryLink(AppHook):
    """A worker's link to the primary: its config source (the primary loads and counts every
    config; the worker adopts it) and the hook that reports its stats and drains on "stop"."""

    def __init__(
        self,
        link: Link,
        config: RateLimitConfig | None,
        stats: MemoryStats,
        report: Report,
        listening: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.link = link
        self._listening = listening
        self._initial_config = config
        self.stats = stats
        self.report = report
        self._app: App | None = None

    # -- ConfigSource --

    async def start(self, sink: ConfigSink) -> None:
        self._sink = sink
        sink.adopted(self._initial_config)

    async def close(self) -> None:
        """The link closes last, in ``closed``, after the final report."""

    # -- AppHook --

    async def started(self, app: App) -> None:
        self._app = app
        loop = asyncio.get_running_loop()
        for task in (
            loop.create_task(self._listen(app), name="primary-link"),
            loop.create_task(self._report_forever(), name="stats-report"),
            loop.create_task(self._ready(), name="ready"),
        ):
            app.defer(functools.partial(cancel_and_wait, task))

    async def _ready(self) -> None:
        if self._listening is not None:
            await self._listening()
        self.link.send(("ready", os.getpid()))

    async def closed(self) -> None:
        try:
            self._send_report()  # the last counts, after the last RPC finished
        finally:
            await self.link.close()

    async def _listen(self, app: App) -> None:
        while (message := await self.link.receive()) is not None:
            if message[0] == "config":
                self._sink.adopted(await decode(message[1]))
            elif message[0] == "stop":
                app.stop()
            elif message[0] == "status":
                app.log_status()
        app.stop()  # the primary is gone: drain and exit rather than serve orphaned

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self._send_report()

    def _send_report(self) -> None:
        self.stats.flush()
        self.link.send(self.report.take())
        app = self._app
        if app is None:
            return
        now = app.clock()
        self.link.send((
            "console",
            {
                "summary": process_summary(app.store, app.latency, app.health),
                "hot_keys": [key.as_dict(now) for key in app.hot_keys.top(now)],
            },
        ))  # fmt: skip
