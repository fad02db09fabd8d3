"""One behaviour suite run against every backend: memory and a real Redis (SPEC 5, 6)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import FakeClock

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config import ConfigFile, RateLimitConfig, load_config
from ratelimit_svc.limiter import (
    CounterStore,
    Increment,
    Limiter,
    LimiterOptions,
    Request,
    RequestDescriptor,
)
from ratelimit_svc.stats import MemoryStats

RULES = """
domain: suite
descriptors:
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: per_minute
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: hot
    rate_limit: {unit: hour, requests_per_unit: 50}
"""


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_config([ConfigFile("suite.yaml", RULES)])


async def open_memory(clock: FakeClock, request: pytest.FixtureRequest) -> CounterStore:
    return MemoryStore(clock)


async def open_redis(clock: FakeClock, request: pytest.FixtureRequest) -> CounterStore:
    from ratelimit_svc.backends.redis import open_redis_store
    from ratelimit_svc.settings import parse_redis

    server = request.getfixturevalue("redis_server")
    server.flushall()
    cfg = parse_redis({"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": server.url}, "REDIS_", "")
    return await open_redis_store(
        cfg, op_timeout=2.0, startup_initial_interval=0.1, startup_max_interval=0.5, startup_max_elapsed=5.0
    )


@pytest.fixture(params=[open_memory, open_redis], ids=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[CounterStore]:
    opened = await request.param(clock, request)
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


async def test_increment_returns_values_and_get_reads_them(store: CounterStore) -> None:
    values = await store.increment([Increment("suite_k_a_1", 2, 60, 60), Increment("suite_k_a_1", 3, 60, 60), Increment("suite_k_b_1", 1, 60, 60)])
    assert values == [2, 5, 1]
    assert await store.get(["suite_k_a_1", "suite_k_b_1", "missing"]) == [5, 1, 0]


async def test_exact_under_concurrency(store: CounterStore, clock: FakeClock, config: RateLimitConfig) -> None:
    lim = limiter(store, clock)
    decisions = await asyncio.gather(*(lim.should_rate_limit(config, req("hot")) for _ in range(400)))
    admitted = sum(d.overall.name == "OK" for d in decisions)
    assert admitted == 50
    remainders = sorted(d.statuses[0].remaining for d in decisions if d.overall.name == "OK")
    assert remainders == list(range(50))


async def test_ping(store: CounterStore) -> None:
    await store.ping()
