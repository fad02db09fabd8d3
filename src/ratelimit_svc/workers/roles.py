"""The two roles of a multi-process service (WORKERS > 1), built on ``App``: the primary (the
whole service, whose stats also sum the workers' and whose configs reach them) and a gRPC worker
(configs from the primary, stats to it). ``run`` starts one process or a primary and its pool."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType

from ratelimit_svc.app import STOP_GRACE_SECONDS, App, cancel_and_wait, serve
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.logsetup import configure_logging
from ratelimit_svc.servers.health import monitor_backend
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.workers.aggregation import AggregateStats, Report
from ratelimit_svc.workers.supervisor import Link, WorkerPool, reserve_port, run_loop, worker_count

log = logging.getLogger(__name__)



REPORT_INTERVAL = 1.0  # seconds between a worker's stats reports to the primary


def run(settings: Settings, env: Mapping[str, str]) -> None:
    """The service: one process, or a primary and its workers (``env`` rebuilds the settings in
    each worker, the environment being the one place settings come from)."""
    count = worker_count(settings)
    if count == 1:
        run_loop(serve(settings))
        return
    reservation = reserve_port(settings.grpc_host, settings.grpc_port)
    try:
        settings = replace(settings, workers=count, grpc_port=reservation.getsockname()[1])
        pool = WorkerPool(
            settings, dict(env), count - 1, target=worker_main, stop_grace=STOP_GRACE_SECONDS
        )
        pool.start()  # before this process has any gRPC object (or even an event loop)
        run_loop(serve(settings, app_factory=lambda s: PrimaryApp(s, pool)))
    finally:
        reservation.close()




class PrimaryApp(App):
    """The process that was started: the whole App (gRPC included), whose stats also sum the
    workers' and whose config reaches them; stopping it stops them."""

    def __init__(self, settings: Settings, pool: WorkerPool) -> None:
        super().__init__(settings)
        self.aggregate = AggregateStats()
        self.stats = self.aggregate
        self.pool = pool

    async def __aenter__(self) -> PrimaryApp:
        await super().__aenter__()
        self.pool.attach(self)
        # Run when the App closes its operations: after its own listeners stopped, before the
        # store and the final stats flush (so the workers' last reports are in it).
        self._operations.push_async_callback(self.pool.wait_stopped)
        return self

    def stop(self) -> None:
        super().stop()
        self.pool.stop()


def worker_main(
    env: dict[str, str], count: int, port: int, index: int, sock: socket.socket
) -> None:
    """A worker process: the primary's settings (same environment), one shared port, no sink."""
    settings = replace(Settings.from_env(env), workers=count, grpc_port=port, disable_stats=True)
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
    await serve(settings, app_factory=lambda s: WorkerApp(s, link, message[1]))


class WorkerApp(App):
    """A gRPC worker: App's store, limiter, service and gRPC listener; no HTTP, debug port,
    config watcher or sink (the primary has them). Configs come from the primary, stats go to
    it, and it drains when the primary says so or goes away."""

    def __init__(self, settings: Settings, link: Link, config: RateLimitConfig | None) -> None:
        super().__init__(settings)
        self.link = link
        self._initial_config = config
        self._report = Report()
        self.stats.sink = self._report

    async def _load_initial_config(self) -> None:
        """The primary's current config: it alone loads files or follows xDS."""
        self.config = self._initial_config

    def reload(self) -> bool:
        """Configs come from the primary (``_listen``): nothing to load here."""
        return self.config is not None

    async def _start_operations(self) -> None:
        """Health (both backend pings and the gRPC health service), the link to the primary."""
        assert self.store is not None and self.grpc is not None
        self.health.observe(self.grpc.set_serving)
        loop = asyncio.get_running_loop()
        for task in (
            loop.create_task(self.health.run(), name="health-publish"),
            loop.create_task(
                monitor_backend(
                    self.store, self.health, ping_timeout=self.settings.redis_op_timeout
                ),
                name="health-backend-ping",
            ),
            loop.create_task(self._listen(), name="primary-link"),
            loop.create_task(self._report_forever(), name="stats-report"),
        ):
            self._operations.push_async_callback(cancel_and_wait, task)
        self.link.send(("ready", os.getpid()))

    async def _listen(self) -> None:
        while (message := await self.link.receive()) is not None:
            if message[0] == "config":
                self.config = message[1]
            elif message[0] == "stop":
                self.stop()
        self.stop()  # the primary is gone: drain and exit rather than serve orphaned

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self._send_report()

    def _send_report(self) -> None:
        self.stats.flush()
        self.link.send(self._report.take())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc, tb)
        finally:
            self._send_report()  # the last counts, after the last RPC finished
            await self.link.close()
