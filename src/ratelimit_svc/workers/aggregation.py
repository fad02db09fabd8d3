"""Worker stats: what a worker reports (``Report``) and their sum in the primary
(``AggregateStats``), so that every stat the primary exports is the service's total."""

from __future__ import annotations

from collections.abc import Mapping

from ratelimit_svc.stats.registry import DEFAULT_MAX_KEYS, PER_KEY_PREFIX, MemoryStats, sanitize


class Report:
    """A ``StatsSink`` that keeps what one ``MemoryStats.flush`` hands it, to send as a message."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, int] = {}
        self.timers: dict[str, list[float]] = {}

    def flush_counter(self, name: str, value: int) -> None:
        self.counters[name] = self.counters.get(name, 0) + value

    def flush_gauge(self, name: str, value: int) -> None:
        self.gauges[name] = value

    def flush_timer(self, name: str, milliseconds: float) -> None:
        samples = self.timers.get(name)
        if samples is None:
            samples = self.timers[name] = []
        samples.append(milliseconds)

    def take(self) -> tuple[str, dict[str, int], dict[str, int], dict[str, list[float]]]:
        message = ("stats", self.counters, self.gauges, self.timers)
        self.counters, self.gauges, self.timers = {}, {}, {}
        return message


class AggregateStats(MemoryStats):
    """The primary's stats: its own plus every worker's. Counter deltas and timer samples are
    added as they come; a gauge is the sum of the primary's value and each live worker's last
    one (connections open, local cache entries), so every stat is the service's total."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__(max_keys)
        self._own_gauges: dict[str, int] = {}
        self._worker_gauges: dict[int, dict[str, int]] = {}
        # The workers' share of the counters the primary also sets as running totals
        # (``set_counter``: pool and breaker counters, a few fixed names). Per-key stats are
        # never running totals and their names are unbounded (one per descriptor value), so
        # they are left out: keeping them leaked ~0.25 MiB/s in `make soak`.
        self._worker_counter_totals: dict[str, int] = {}

    def set_gauge(self, name: str, value: int) -> None:
        name = sanitize(name)
        self._own_gauges[name] = value
        super().set_gauge(name, value + self._worker_gauge_sum(name))

    def set_counter(self, name: str, total: int) -> None:
        # A running total kept by one of the primary's own objects: the workers' share on top.
        name = sanitize(name)
        super().set_counter(name, total + self._worker_counter_totals.get(name, 0))

    def merge(
        self,
        worker: int,
        counters: Mapping[str, int],
        gauges: Mapping[str, int],
        timers: Mapping[str, list[float]],
    ) -> None:
        """Add one worker report."""
        totals = self._worker_counter_totals
        for name, delta in counters.items():
            if not name.startswith(PER_KEY_PREFIX):
                totals[name] = totals.get(name, 0) + delta
            self.add(name, delta)
        mine = self._worker_gauges.setdefault(worker, {})
        mine.update(gauges)
        for name in gauges:
            super().set_gauge(name, self._own_gauges.get(name, 0) + self._worker_gauge_sum(name))
        for name, samples in timers.items():
            for milliseconds in samples:
                self.observe_ms(name, milliseconds)

    def forget(self, worker: int) -> None:
        """A worker has exited: its gauges no longer count (its counters do)."""
        for name in self._worker_gauges.pop(worker, {}):
            super().set_gauge(name, self._own_gauges.get(name, 0) + self._worker_gauge_sum(name))

    def _worker_gauge_sum(self, name: str) -> int:
        return sum(g.get(name, 0) for g in self._worker_gauges.values())
