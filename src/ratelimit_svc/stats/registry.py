"""The service's stats: ``MemoryStats`` holds counters, gauges and timers under the reference's
statsd names, hands counter deltas, gauges and timer samples to a ``StatsSink`` on ``flush``, and
keeps per-key stats in an LRU of ``max_keys`` stats keys whose evicted keys are flushed first;
``scope`` gives the ``Scope`` a store reports its own numbers into (docs/observability.md (Stats,
Bounded per-key stats)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Protocol

from ratelimit_svc.limiter.windows import RuleCounts

RULE_STATS = tuple(f.name for f in fields(RuleCounts))
# Counted by whichever loader swaps a config in: the file reloader (app) or the xDS client.
STAT_LOAD_SUCCESS = "ratelimit.service.config_load_success"
STAT_LOAD_ERROR = "ratelimit.service.config_load_error"
PER_KEY_PREFIX = "ratelimit.service.rate_limit."
DEFAULT_MAX_KEYS = 10_000
_SANITIZE = str.maketrans({":": "_", "|": "_"})


def sanitize(name: str) -> str:
    return name.translate(_SANITIZE)


class StatsSink(Protocol):
    """Where flushed stats go (the statsd, DogStatsD and Prometheus sinks); gostats' Sink."""

    def flush_counter(self, name: str, value: int) -> None: ...

    def flush_gauge(self, name: str, value: int) -> None: ...

    def flush_timer(self, name: str, milliseconds: float) -> None: ...


Collector = Callable[["MemoryStats"], None]


class _Counter:
    __slots__ = ("flushed", "total")

    def __init__(self) -> None:
        self.total = 0
        self.flushed = 0


class MemoryStats:
    """Monotonic counters (flushed as deltas), last-value gauges and timers, by statsd name."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.sink: StatsSink | None = None
        self._counters: dict[str, _Counter] = {}
        # stats key -> {stat -> counter}; least recently used first.
        self._keys: OrderedDict[str, dict[str, _Counter]] = OrderedDict()
        self._rule_rows: dict[str, tuple[_Counter, ...]] = {}  # see add_rule
        self._gauges: dict[str, int] = {}
        self.timers: dict[str, list[float]] = {}  # name -> [count, total milliseconds]
        self._collectors: list[Collector] = []
        self.evicted_keys = 0

    # -- writing ---------------------------------------------------------------------------------

    def add(self, name: str, value: int = 1) -> None:
        counter = self._counters.get(name)  # hot path: a name seen before (so sanitized already)
        if counter is not None and not name.startswith(PER_KEY_PREFIX):
            counter.total += value
            return
        name = sanitize(name)
        if name.startswith(PER_KEY_PREFIX):
            key, _, stat = name[len(PER_KEY_PREFIX) :].rpartition(".")
            if key:
                self._key_counters(key).setdefault(stat, _Counter()).total += value
                return
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = _Counter()
        counter.total += value

    def add_rule(self, stats_key: str, counts: RuleCounts) -> None:
        """Add one decision's deltas to the six stats of ``stats_key``."""
        row = self._rule_rows.get(stats_key)  # hot path: a key held (so sanitized already)
        if row is None:
            row = self._rule_row(stats_key)
        else:
            self._keys.move_to_end(stats_key)
        total_hits, over_limit, near_limit, within_limit, shadow_mode, local_cache = row
        total_hits.total += counts.total_hits
        over_limit.total += counts.over_limit
        near_limit.total += counts.near_limit
        within_limit.total += counts.within_limit
        shadow_mode.total += counts.shadow_mode
        local_cache.total += counts.over_limit_with_local_cache

    def add_within(self, stats_key: str, hits: int) -> None:
        """``add_rule`` of a decision within the limit and below the near-limit threshold (the
        limiter's usual answer): ``hits`` to total_hits and within_limit."""
        row = self._rule_rows.get(stats_key)
        if row is None:
            row = self._rule_row(stats_key)
        else:
            self._keys.move_to_end(stats_key)
        row[0].total += hits
        row[3].total += hits

    def _rule_row(self, stats_key: str) -> tuple[_Counter, ...]:
        """The six counters of ``stats_key`` in RULE_STATS order, kept for the key's next
        decisions while it is held under its own name (until evicted)."""
        key = sanitize(stats_key)
        counters = self._key_counters(key)
        row = tuple([counters.setdefault(stat, _Counter()) for stat in RULE_STATS])
        if key == stats_key:
            self._rule_rows[key] = row
        return row

    def set_counter(self, name: str, total: int) -> None:
        """Set a counter kept elsewhere (e.g. connections ever opened) to its running total."""
        name = sanitize(name)
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = _Counter()
        counter.total = total

    def set_gauge(self, name: str, value: int) -> None:
        self._gauges[sanitize(name)] = value

    def observe_ms(self, name: str, milliseconds: float) -> None:
        timer = self.timers.get(name)  # hot path: a name seen before (so sanitized already)
        if timer is None:
            name = sanitize(name)
            timer = self.timers.get(name)
            if timer is None:
                timer = self.timers[name] = [0, 0.0]
        timer[0] += 1
        timer[1] += milliseconds
        if self.sink is not None:
            self.sink.flush_timer(name, milliseconds)  # as gostats: timers are not aggregated

    def scope(self, name: str) -> Scope:
        """A ``StatsScope`` (limiter/store.py) whose names start with ``name``."""
        return Scope(self, name)

    def add_collector(self, collector: Collector) -> None:
        """Call ``collector(self)`` before each flush and snapshot (to set pool or cache gauges)."""
        self._collectors.append(collector)

    def _key_counters(self, key: str) -> dict[str, _Counter]:
        keys = self._keys
        counters = keys.get(key)
        if counters is not None:
            keys.move_to_end(key)
            return counters
        counters = keys[key] = {}
        if len(keys) > self.max_keys:
            self._evict()
        return counters

    def _evict(self) -> None:
        old_key, old = self._keys.popitem(last=False)
        self._rule_rows.pop(old_key, None)
        self.evicted_keys += 1
        sink = self.sink
        if sink is None:
            return
        prefix = f"{PER_KEY_PREFIX}{old_key}."
        for stat, counter in old.items():
            delta = counter.total - counter.flushed
            if delta:
                sink.flush_counter(prefix + stat, delta)

    # -- reading ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand every counter's delta since the last flush, and every gauge, to the sink."""
        self._collect()
        sink = self.sink
        if sink is None:
            return
        for name, counter in self._counters.items():
            if counter.total != counter.flushed:
                sink.flush_counter(name, counter.total - counter.flushed)
                counter.flushed = counter.total
        for key, counters in self._keys.items():
            for stat, counter in counters.items():
                if counter.total != counter.flushed:
                    sink.flush_counter(
                        f"{PER_KEY_PREFIX}{key}.{stat}", counter.total - counter.flushed
                    )
                    counter.flushed = counter.total
        for name, value in self._gauges.items():
            sink.flush_gauge(name, value)

    def _collect(self) -> None:
        for collector in self._collectors:
            collector(self)

    def get(self, name: str) -> int:
        name = sanitize(name)
        counter = self._counters.get(name)
        if counter is None and name.startswith(PER_KEY_PREFIX):
            key, _, stat = name[len(PER_KEY_PREFIX) :].rpartition(".")
            counter = self._keys.get(key, {}).get(stat)
        if counter is not None:
            return counter.total
        return self._gauges.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        """Cumulative counters (of the keys still held) and current gauges, by name."""
        self._collect()
        values = {name: c.total for name, c in self._counters.items()}
        for key, counters in self._keys.items():
            for stat, counter in counters.items():
                values[f"{PER_KEY_PREFIX}{key}.{stat}"] = counter.total
        values.update(self._gauges)
        return values

    def key_totals(self) -> Iterator[tuple[str, dict[str, int]]]:
        """Each held stats key with its cumulative per-key stats (the console's traffic)."""
        for key, counters in self._keys.items():
            yield key, {stat: counter.total for stat, counter in counters.items()}

    def __len__(self) -> int:
        """How many stats keys the LRU holds (at most ``max_keys``)."""
        return len(self._keys)


# -- collectors for stats kept by other objects ---------------------------------------------------


class Scope:
    """The ``StatsScope`` a store or wrapper is built with: names under a prefix, read at flush."""

    def __init__(self, stats: MemoryStats, prefix: str) -> None:
        self._stats = stats
        self.prefix = prefix

    def scope(self, name: str) -> Scope:
        return Scope(self._stats, f"{self.prefix}.{name}")

    def gauge(self, name: str, read: Callable[[], int]) -> None:
        full = f"{self.prefix}.{name}"
        self._stats.add_collector(lambda stats: stats.set_gauge(full, read()))

    def counter(self, name: str, read_total: Callable[[], int]) -> None:
        full = f"{self.prefix}.{name}"
        self._stats.add_collector(lambda stats: stats.set_counter(full, read_total()))


class _LocalCacheSource(Protocol):
    hit_count: int
    miss_count: int
    evacuate_count: int
    expired_count: int

    def __len__(self) -> int: ...


def local_cache_collector(cache: _LocalCacheSource) -> Collector:
    """The reference's ``ratelimit.localcache.*`` gauges (freecache's counters)."""

    def collect(stats: MemoryStats) -> None:
        hits, misses = cache.hit_count, cache.miss_count
        scope = "ratelimit.localcache"
        stats.set_gauge(f"{scope}.hitCount", hits)
        stats.set_gauge(f"{scope}.missCount", misses)
        stats.set_gauge(f"{scope}.lookupCount", hits + misses)
        stats.set_gauge(f"{scope}.entryCount", len(cache))
        stats.set_gauge(f"{scope}.evacuateCount", cache.evacuate_count)
        stats.set_gauge(f"{scope}.expiredCount", cache.expired_count)
        stats.set_gauge(f"{scope}.overwriteCount", getattr(cache, "overwrite_count", 0))
        stats.set_gauge(f"{scope}.averageAccessTime", 0)  # not measured here

    return collect
