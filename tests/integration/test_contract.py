"""The CounterStore contract, run against every backend and every way of reaching one
(docs/backends.md):
memory; a single Redis, a Redis Cluster and Redis through Sentinel, each with and without
cross-request pipelining; REDIS_PERSECOND splitting counters between a single Redis and a
cluster; and memcached. Counts, windows, expiry, hits_addend and exactness under concurrency are
asserted the same way everywhere.

Memcached increments in the background; within one process the store answers from the highest
value it has handed out, so these single-process assertions hold for it exactly too. What it does
not guarantee across processes is tested in tests/integration/test_memcache.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support.clock import FakeClock
from support.cluster_fixtures import REDIS_PASSWORD, SENTINEL_PASSWORD

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions, Request, RequestDescriptor
from ratelimit_svc.limiter.store import CounterStore, Increment
from ratelimit_svc.settings.model import RedisSettings
from ratelimit_svc.stats.registry import MemoryStats

RULES = """
domain: suite
descriptors:
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: per_minute
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: hot
    rate_limit: {unit: hour, requests_per_unit: 50}
  - key: hot_second
    rate_limit: {unit: second, requests_per_unit: 50}
"""

# (clock, request, fresh): fresh=False reaches the same data without emptying it first.
Opener = Callable[[FakeClock, pytest.FixtureRequest, bool], Awaitable[CounterStore]]
PIPELINE_WINDOW = 0.002


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_config([ConfigFile("suite.yaml", RULES)])


async def _redis(cfg: RedisSettings) -> CounterStore:
    from ratelimit_svc.backends.redis import open_redis_store

    store: CounterStore = await open_redis_store(
        cfg, op_timeout=3.0, startup_initial_interval=0.1, startup_max_interval=0.5, startup_max_elapsed=10.0
    )
    return store


def _single(request: pytest.FixtureRequest, fresh: bool, **options: Any) -> RedisSettings:
    server = request.getfixturevalue("redis_server")
    server.ensure_running()
    if fresh:
        server.flushall()
    return RedisSettings(socket_type="tcp", url=server.url, **options)


def _cluster(request: pytest.FixtureRequest, fresh: bool, **options: Any) -> RedisSettings:
    cluster = request.getfixturevalue("redis_cluster")
    if fresh:
        cluster.flushall()
    return RedisSettings(type="cluster", url=cluster.url, **options)


async def open_memory(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    return MemoryStore(clock)


async def open_redis(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    return await _redis(_single(request, fresh))


async def open_redis_pipelined(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    return await _redis(_single(request, fresh, pipeline_window=PIPELINE_WINDOW, pipeline_limit=16))


async def open_cluster(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    return await _redis(_cluster(request, fresh))


async def open_cluster_pipelined(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    return await _redis(_cluster(request, fresh, pipeline_window=PIPELINE_WINDOW))


async def open_sentinel(
    clock: FakeClock, request: pytest.FixtureRequest, fresh: bool, **options: Any
) -> CounterStore:
    setup = request.getfixturevalue("redis_sentinel")
    if fresh:
        setup.flushall()
    return await _redis(
        RedisSettings(type="sentinel", url=setup.url, auth=REDIS_PASSWORD, sentinel_auth=SENTINEL_PASSWORD, **options)
    )


async def open_sentinel_pipelined(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    return await open_sentinel(clock, request, fresh, pipeline_window=PIPELINE_WINDOW)


async def open_persecond(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    from ratelimit_svc.backends.persecond import PerSecondStore

    main = await _redis(_single(request, fresh))
    return PerSecondStore(main, await _redis(_cluster(request, fresh)))


async def open_memcache(clock: FakeClock, request: pytest.FixtureRequest, fresh: bool) -> CounterStore:
    from ratelimit_svc.backends.memcache.store import MemcacheStore

    server = request.getfixturevalue("memcached_server")
    if fresh:
        server.flush()
    store = MemcacheStore([server.url], op_timeout=3.0, clock=clock)
    await store.start()
    return store


OPENERS: dict[str, Opener] = {
    "memory": open_memory,
    "redis": open_redis,
    "redis_pipelined": open_redis_pipelined,
    "cluster": open_cluster,
    "cluster_pipelined": open_cluster_pipelined,
    "sentinel": open_sentinel,
    "sentinel_pipelined": open_sentinel_pipelined,
    "persecond": open_persecond,
    "memcache": open_memcache,
}


@pytest.fixture(params=list(OPENERS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(backend: str, request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[CounterStore]:
    opened = await OPENERS[backend](clock, request, True)
    try:
        yield opened
    finally:
        await opened.close()


def limiter(store: CounterStore, clock: FakeClock, **options: Any) -> Limiter:
    return Limiter(store=store, stats=MemoryStats(), options=LimiterOptions(**options), clock=clock)


def req(key: str, value: str = "v", hits: int | None = None, request_hits: int = 0) -> Request:
    return Request("suite", (RequestDescriptor(((key, value),), None, hits),), request_hits)


async def remaining(lim: Limiter, config: RateLimitConfig, request: Request) -> int:
    return (await lim.should_rate_limit(config, request)).statuses[0].remaining


# -- counts and windows --------------------------------------------------------------------------


async def test_counts_within_a_window(store: CounterStore, clock: FakeClock, config: RateLimitConfig) -> None:
    lim = limiter(store, clock, expiration_jitter_max_seconds=0)
    assert [await remaining(lim, config, req("per_minute")) for _ in range(5)] == [4, 3, 2, 1, 0]
    decision = await lim.should_rate_limit(config, req("per_minute"))
    assert decision.overall.name == "OVER_LIMIT"


async def test_new_window_starts_fresh(store: CounterStore, clock: FakeClock, config: RateLimitConfig) -> None:
    lim = limiter(store, clock, expiration_jitter_max_seconds=0)
    for _ in range(3):
        await lim.should_rate_limit(config, req("per_second"))
    assert (await lim.should_rate_limit(config, req("per_second"))).overall.name == "OVER_LIMIT"
    clock.advance(1)
    assert await remaining(lim, config, req("per_second")) == 2
    clock.advance(59)
    assert await remaining(lim, config, req("per_minute")) == 4


async def test_values_are_independent_counters(store: CounterStore, clock: FakeClock, config: RateLimitConfig) -> None:
    lim = limiter(store, clock)
    await lim.should_rate_limit(config, req("per_minute", "a"))
    await lim.should_rate_limit(config, req("per_minute", "a"))
    assert await remaining(lim, config, req("per_minute", "b")) == 4


async def test_hits_addend(store: CounterStore, clock: FakeClock, config: RateLimitConfig) -> None:
    lim = limiter(store, clock)
    assert await remaining(lim, config, req("per_minute", request_hits=3)) == 2
    assert await remaining(lim, config, req("per_minute", hits=0)) == 2  # check only
    assert await remaining(lim, config, req("per_minute", hits=2, request_hits=9)) == 0


async def test_several_descriptors_of_several_units_in_one_request(
    store: CounterStore, clock: FakeClock, config: RateLimitConfig
) -> None:
    lim = limiter(store, clock)
    request = Request(
        "suite",
        tuple(RequestDescriptor(((key, value),)) for key in ("per_second", "per_minute", "hot") for value in "abc"),
    )
    first = await lim.should_rate_limit(config, request)
    second = await lim.should_rate_limit(config, request)
    assert [s.remaining for s in first.statuses] == [2, 2, 2, 4, 4, 4, 49, 49, 49]
    assert [s.remaining for s in second.statuses] == [1, 1, 1, 3, 3, 3, 48, 48, 48]


async def test_increment_returns_values_and_get_reads_them(store: CounterStore) -> None:
    values = await store.increment(
        [Increment("suite_k_a_1", 2, 60, 60), Increment("suite_k_a_1", 3, 60, 60), Increment("suite_k_b_1", 1, 60, 60)]
    )
    assert values == [2, 5, 1]
    assert await store.get(["suite_k_a_1", "suite_k_b_1", "missing"]) == [5, 1, 0]


async def test_mixed_windows_in_one_batch_keep_their_order(store: CounterStore) -> None:
    increments = [Increment(f"suite_mix_{i}_1", i + 1, 1 if i % 2 else 60, 61) for i in range(8)]
    assert await store.increment(increments) == [i + 1 for i in range(8)]
    assert await store.increment(increments) == [2 * (i + 1) for i in range(8)]
    assert await store.get([inc.key for inc in increments]) == [2 * (i + 1) for i in range(8)]


async def test_exact_under_concurrency(store: CounterStore, clock: FakeClock, config: RateLimitConfig) -> None:
    lim = limiter(store, clock)
    for key in ("hot", "hot_second"):
        decisions = await asyncio.gather(*(lim.should_rate_limit(config, req(key)) for _ in range(300)))
        admitted = sorted(d.statuses[0].remaining for d in decisions if d.overall.name == "OK")
        assert admitted == list(range(50)), key


async def test_ping(store: CounterStore) -> None:
    await store.ping()


# -- expiry ----------------------------------------------------------------------------------------


async def test_a_counter_expires_after_its_ttl(store: CounterStore, clock: FakeClock) -> None:
    key = "suite_expiring_1700000005"
    assert await store.increment([Increment(key, 4, 1, 1)]) == [4]
    # Real servers expire on their own clock (memcached's ticks once a second): poll, moving the
    # fake clock along for the in-process stores.
    deadline = time.monotonic() + 5.0
    while await store.get([key]) != [0]:
        assert time.monotonic() < deadline, "the counter never expired"
        clock.advance(1)
        await asyncio.sleep(0.05)
    assert await store.increment([Increment(key, 1, 1, 1)]) == [1]


@pytest.mark.parametrize("window", [3600, 2592000, 31536000], ids=["hour", "month", "year"])
async def test_counters_outlive_the_store_that_wrote_them(
    window: int, backend: str, store: CounterStore, request: pytest.FixtureRequest, clock: FakeClock
) -> None:
    """Another replica (a second store) sees the counts, also for windows whose expiry is over
    memcached's 30-day limit for relative expiry times."""
    if backend == "memory":
        pytest.skip("in-process counters live and die with their store")
    key = f"suite_long_{window}_1699999200"
    await store.increment([Increment(key, 7, window, window + 300)])
    await store.close()  # for memcached: the background increments land before close returns
    reader = await OPENERS[backend](clock, request, False)
    try:
        assert await reader.get([key]) == [7]
        assert await reader.increment([Increment(key, 1, window, window + 300)]) == [8]
    finally:
        await reader.close()
