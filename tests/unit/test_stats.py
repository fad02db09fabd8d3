"""docs/observability.md (Stats): the in-memory stats, their flush as deltas, and the LRU that bounds per-key stats."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Sequence

from support.clock import FakeClock

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.limiter.limiter import Limiter, Request, RequestDescriptor
from ratelimit_svc.limiter.localcache import LocalCache
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.limiter.windows import RuleCounts
from ratelimit_svc.stats.registry import (
    RULE_STATS,
    MemoryStats,
    local_cache_collector,
)


class RecordingSink:
    """A StatsSink that remembers what was flushed, in order."""

    def __init__(self) -> None:
        self.counters: list[tuple[str, int]] = []
        self.gauges: list[tuple[str, int]] = []
        self.timers: list[tuple[str, float]] = []

    def flush_counter(self, name: str, value: int) -> None:
        self.counters.append((name, value))

    def flush_gauge(self, name: str, value: int) -> None:
        self.gauges.append((name, value))

    def flush_timer(self, name: str, milliseconds: float) -> None:
        self.timers.append((name, milliseconds))

    def total(self, name: str) -> int:
        return sum(v for n, v in self.counters if n == name)


def test_counters_flush_as_deltas_and_only_when_changed() -> None:
    stats, sink = MemoryStats(), RecordingSink()
    stats.sink = sink
    stats.add("ratelimit.service.config_load_success")
    stats.add("ratelimit_server.ShouldRateLimit.total_requests", 3)
    stats.flush()
    assert sorted(sink.counters) == [
        ("ratelimit.service.config_load_success", 1),
        ("ratelimit_server.ShouldRateLimit.total_requests", 3),
    ]
    sink.counters.clear()
    stats.flush()
    assert sink.counters == []  # nothing changed: nothing sent
    stats.add("ratelimit_server.ShouldRateLimit.total_requests", 2)
    stats.flush()
    assert sink.counters == [("ratelimit_server.ShouldRateLimit.total_requests", 2)]
    assert stats.get("ratelimit_server.ShouldRateLimit.total_requests") == 5  # cumulative here


def test_rule_stats_gauges_and_timers() -> None:
    stats, sink = MemoryStats(), RecordingSink()
    stats.sink = sink
    stats.add_rule("basic.key1", RuleCounts(total_hits=2, within_limit=2))
    stats.set_gauge("ratelimit.redis_pool.cx_active", 4)
    stats.observe_ms("ratelimit_server.ShouldRateLimit.response_time", 1.5)
    assert sink.timers == [("ratelimit_server.ShouldRateLimit.response_time", 1.5)]  # at once
    stats.flush()
    assert ("ratelimit.service.rate_limit.basic.key1.total_hits", 2) in sink.counters
    assert ("ratelimit.service.rate_limit.basic.key1.within_limit", 2) in sink.counters
    assert not any(name.endswith("over_limit") for name, _ in sink.counters)  # zero deltas
    assert sink.gauges == [("ratelimit.redis_pool.cx_active", 4)]
    snapshot = stats.snapshot()
    assert snapshot["ratelimit.service.rate_limit.basic.key1.over_limit"] == 0
    assert snapshot["ratelimit.redis_pool.cx_active"] == 4
    assert stats.timers["ratelimit_server.ShouldRateLimit.response_time"] == [1, 1.5]


def test_each_rule_stat_counts_into_its_own_name() -> None:
    stats = MemoryStats()
    counts = RuleCounts(
        total_hits=1, over_limit=2, near_limit=3, within_limit=4, shadow_mode=5,
        over_limit_with_local_cache=6,
    )  # fmt: skip
    for _ in range(2):  # the first decision creates the key's counters, the second reuses them
        stats.add_rule("d.k", counts)
    prefix = "ratelimit.service.rate_limit.d.k."
    assert {name: stats.get(prefix + name) for name in RULE_STATS} == {
        "total_hits": 2, "over_limit": 4, "near_limit": 6, "within_limit": 8, "shadow_mode": 10,
        "over_limit_with_local_cache": 12,
    }  # fmt: skip


def test_add_within_counts_as_add_rule_of_a_within_limit_decision() -> None:
    # The limiter's shortcut for its usual answer (docs/performance.md): the same stats as
    # add_rule with decide's within-limit deltas, on a held key and on a new one.
    by_rule, by_within = MemoryStats(max_keys=2), MemoryStats(max_keys=2)
    for key, hits in [("d.a", 1), ("d.a", 3), ("d.b:x", 2), ("d.c", 1), ("d.a", 4)]:
        by_rule.add_rule(key, RuleCounts(total_hits=hits, within_limit=hits))
        by_within.add_within(key, hits)
    assert by_within.snapshot() == by_rule.snapshot()
    assert by_within.snapshot()["ratelimit.service.rate_limit.d.a.within_limit"] == 4
    assert by_within.evicted_keys == by_rule.evicted_keys == 2


def test_names_are_sanitized() -> None:
    stats = MemoryStats()
    stats.add_rule("d.key_a:b|c", RuleCounts(total_hits=1))
    assert stats.get("ratelimit.service.rate_limit.d.key_a_b_c.total_hits") == 1


def test_lru_evicts_least_recently_used_key_and_flushes_it_first() -> None:
    stats, sink = MemoryStats(max_keys=2), RecordingSink()
    stats.sink = sink
    stats.add_rule("d.a", RuleCounts(total_hits=1))
    stats.add_rule("d.b", RuleCounts(total_hits=1))
    stats.add_rule("d.a", RuleCounts(total_hits=1))  # a is now the most recent
    stats.add_rule("d.c", RuleCounts(total_hits=5))  # evicts b
    assert len(stats) == 2
    assert stats.evicted_keys == 1
    assert sink.counters == [("ratelimit.service.rate_limit.d.b.total_hits", 1)]
    stats.flush()
    assert sink.total("ratelimit.service.rate_limit.d.a.total_hits") == 2
    assert sink.total("ratelimit.service.rate_limit.d.c.total_hits") == 5
    # b comes back: counted from zero, and its earlier count was not lost
    stats.add_rule("d.b", RuleCounts(total_hits=1))
    stats.flush()
    assert sink.total("ratelimit.service.rate_limit.d.b.total_hits") == 2


def test_evicted_key_flushed_only_for_what_was_not_flushed_yet() -> None:
    stats, sink = MemoryStats(max_keys=1), RecordingSink()
    stats.sink = sink
    stats.add_rule("d.a", RuleCounts(total_hits=3))
    stats.flush()
    stats.add_rule("d.a", RuleCounts(total_hits=1))
    stats.add_rule("d.b", RuleCounts(total_hits=1))  # evicts a with a pending delta of 1
    assert sink.total("ratelimit.service.rate_limit.d.a.total_hits") == 4


def test_domain_not_found_is_a_bounded_per_key_stat() -> None:
    stats = MemoryStats(max_keys=10)
    for i in range(100):
        stats.add(f"ratelimit.service.rate_limit.unknown{i}.domain_not_found")
    assert len(stats) == 10
    assert stats.get("ratelimit.service.rate_limit.unknown99.domain_not_found") == 1
    assert stats.get("ratelimit.service.rate_limit.unknown0.domain_not_found") == 0


def test_scopes_and_collectors_report_at_flush() -> None:
    pool = {"cx_active": 2, "cx_total": 7}
    cache = LocalCache(10_000)
    cache.add("k", 100)
    cache.contains("k", 50)
    cache.contains("other", 50)
    stats, sink = MemoryStats(), RecordingSink()
    stats.sink = sink
    scope = stats.scope("ratelimit")
    scope.scope("redis_pool").gauge("cx_active", lambda: pool["cx_active"])
    scope.scope("redis_pool").counter("cx_total", lambda: pool["cx_total"])
    stats.add_collector(local_cache_collector(cache))
    stats.flush()
    gauges = dict(sink.gauges)
    assert gauges["ratelimit.redis_pool.cx_active"] == 2
    assert ("ratelimit.redis_pool.cx_total", 7) in sink.counters
    assert gauges["ratelimit.localcache.hitCount"] == 1
    assert gauges["ratelimit.localcache.missCount"] == 1
    assert gauges["ratelimit.localcache.lookupCount"] == 2
    assert gauges["ratelimit.localcache.entryCount"] == 1
    sink.counters.clear()
    stats.flush()
    assert sink.counters == []  # a collected total that did not move sends no delta
    pool.update(cx_active=1, cx_total=9)  # read at each flush: no call per request
    stats.flush()
    assert ("ratelimit.redis_pool.cx_total", 2) in sink.counters
    assert dict(sink.gauges)["ratelimit.redis_pool.cx_active"] == 1


# -- high cardinality: 100k distinct values through the limiter ---------------------------------

DETAILED = """
domain: hc
descriptors:
  - key: user
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 1000}
"""


class ConstantStore:
    """A CounterStore that keeps nothing, so only the stats can grow."""

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        return [1] * len(increments)

    async def get(self, keys: Sequence[str]) -> list[int]:
        return [0] * len(keys)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class SummingSink(RecordingSink):
    """Keeps only sums, so the sink itself stays small."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, int] = {}

    def flush_counter(self, name: str, value: int) -> None:
        stat = name.rpartition(".")[2]
        self.sums[stat] = self.sums.get(stat, 0) + value


async def test_30k_distinct_detailed_values_keep_stats_memory_bounded(clock: FakeClock) -> None:
    max_keys = 1000
    config = load_config([ConfigFile("hc.yaml", DETAILED)])
    stats, sink = MemoryStats(max_keys=max_keys), SummingSink()
    stats.sink = sink
    limiter = Limiter(store=ConstantStore(), stats=stats, clock=clock)

    async def drive(start: int, stop: int) -> None:
        for i in range(start, stop):
            request = Request("hc", (RequestDescriptor((("user", f"u{i:06d}"),)),))
            await limiter.should_rate_limit(config, request)

    await drive(0, 10_000)  # the LRU is full long before this
    assert len(stats) == max_keys
    gc.collect()
    tracemalloc.start()
    try:
        await drive(10_000, 30_000)
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()  # allocated since start() and still alive
    finally:
        tracemalloc.stop()
    assert len(stats) == max_keys
    assert stats.evicted_keys == 30_000 - max_keys
    # What the 20k new keys left behind is at most a full LRU's worth (each of the max_keys
    # entries now holds a newer key); unbounded, it would be 20k keys * 6 counters, ~13 MB.
    assert grown < max_keys * 1024, grown
    # Nothing counted is lost: evicted keys were flushed before they went.
    stats.flush()
    assert sink.sums["total_hits"] == 30_000
    assert sink.sums["within_limit"] == 30_000
    assert stats.get("ratelimit.service.rate_limit.hc.user_u029999.total_hits") == 1
