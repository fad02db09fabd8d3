"""Which stats sink runs, from one table over the settings (none, statsd, DogStatsD or Prometheus),
and ``StatsReporter``, the loop that flushes to it every STATS_FLUSH_INTERVAL and once more when
it stops (docs/observability.md (Stats)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.settings.model import StatsSettings
from ratelimit_svc.stats.registry import MemoryStats, StatsSink

log = logging.getLogger(__name__)


class RunningSink(StatsSink, Protocol):
    async def start(self) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


def _statsd(settings: StatsSettings, stats: MemoryStats) -> RunningSink:
    from ratelimit_svc.stats.statsd import StatsdSink

    return StatsdSink(
        settings.statsd_host,
        settings.statsd_port,
        protocol=settings.statsd_protocol,
        extra_tags=settings.extra_tags,
    )


def _dogstatsd(settings: StatsSettings, stats: MemoryStats) -> RunningSink:
    from ratelimit_svc.stats.statsd import StatsdSink

    if settings.use_dog_statsd_mogrifiers:
        # The DOG_STATSD_MOGRIFIER_<NAME>_{PATTERN,NAME,TAGS} definitions are not read by
        # Settings yet: refuse rather than send untransformed names the operator did not expect.
        raise SettingsError(
            "USE_DOG_STATSD_MOGRIFIERS is not supported yet: unset it to send plain names"
        )
    return StatsdSink(
        settings.statsd_host,
        settings.statsd_port,
        protocol="udp",
        extra_tags=settings.extra_tags,
        dogstatsd=True,
    )


def _prometheus(settings: StatsSettings, stats: MemoryStats) -> RunningSink:
    from ratelimit_svc.stats.prometheus import PrometheusSink

    return PrometheusSink(
        settings.prometheus_addr,
        settings.prometheus_path,
        max_series=stats.max_keys,
        before_scrape=stats.flush,
    )


SINKS: dict[str, Callable[[StatsSettings, MemoryStats], RunningSink]] = {
    "statsd": _statsd,
    "dogstatsd": _dogstatsd,
    "prometheus": _prometheus,
}


def sink_kind(settings: StatsSettings) -> str | None:
    if settings.disable_stats:
        return None
    if settings.use_prometheus:
        return "prometheus"
    if settings.use_dog_statsd:
        return "dogstatsd"
    if settings.use_statsd:
        return "statsd"
    return None


class StatsReporter:
    """Flushes ``stats`` into ``sink`` every ``interval`` seconds, and once more at close."""

    def __init__(self, stats: MemoryStats, sink: RunningSink, interval: float) -> None:
        self.stats = stats
        self.sink = sink
        self.interval = interval if interval > 0 else 10.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sink.start()
        self.stats.sink = self.sink
        self._task = asyncio.create_task(self._run(), name="stats-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        self.stats.flush()
        await self.sink.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        finally:
            self.stats.sink = None
            await self.sink.close()


async def start_reporter(settings: StatsSettings, stats: MemoryStats) -> StatsReporter | None:
    """Start the sink the settings choose (None: stats stay in memory only)."""
    kind = sink_kind(settings)
    if kind is None:
        return None
    reporter = StatsReporter(stats, SINKS[kind](settings, stats), settings.stats_flush_interval)
    await reporter.start()
    log.info("stats sink: %s, flushed every %gs", kind, reporter.interval)
    return reporter
