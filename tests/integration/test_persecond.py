"""REDIS_PERSECOND=true: SECOND-unit counters go to a second Redis (of any REDIS_TYPE), the rest to
the main one; a mixed batch is split, sent to both at once, and merged back in order."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support.clock import FakeClock
from support.cluster_fixtures import RedisCluster
from support.redis_fixtures import RedisServer
from support.stores import OpenMemoryStore

from ratelimit_svc.backends import open_store
from ratelimit_svc.backends.persecond import PerSecondStore
from ratelimit_svc.backends.redis.single import RedisStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions, Request, RequestDescriptor
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.settings.model import RedisSettings, Settings
from ratelimit_svc.stats.registry import MemoryStats

RULES = """
domain: split
descriptors:
  - key: fast
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: slow
    rate_limit: {unit: minute, requests_per_unit: 2}
"""


def keys_of(server: RedisServer) -> set[str]:
    with server.client() as admin:
        return {key.decode() for key in admin.keys("*")}


@pytest.fixture
async def split_store(
    redis_db: RedisServer, redis_server_factory: Callable[..., RedisServer]
) -> AsyncIterator[tuple[PerSecondStore, RedisServer, RedisServer]]:
    fast_server = redis_server_factory()
    store = PerSecondStore(
        RedisStore(RedisSettings(socket_type="tcp", url=redis_db.url), op_timeout=2.0),
        RedisStore(RedisSettings(socket_type="tcp", url=fast_server.url), op_timeout=2.0),
    )
    yield store, redis_db, fast_server
    await store.close()


async def test_second_windows_go_to_the_per_second_redis(
    split_store: tuple[PerSecondStore, RedisServer, RedisServer],
) -> None:
    store, main, fast = split_store
    increments = [
        Increment("s_a_1700000005", 1, 1, 1),
        Increment("m_a_1699999980", 2, 60, 60),
        Increment("s_b_1700000005", 3, 1, 1),
        Increment("h_a_1699999200", 4, 3600, 3600),
    ]
    assert await store.increment(increments) == [1, 2, 3, 4]
    assert await store.increment(increments) == [2, 4, 6, 8]
    assert keys_of(fast) == {"s_a_1700000005", "s_b_1700000005"}
    assert keys_of(main) == {"m_a_1699999980", "h_a_1699999200"}
    assert await store.get([inc.key for inc in increments] + ["missing"]) == [2, 4, 6, 8, 0]
    # One side only: the other store is not called at all.
    assert await store.increment([Increment("s_c_1700000005", 1, 1, 1)]) == [1]
    assert await store.increment([Increment("m_c_1699999980", 1, 60, 60)]) == [1]


async def test_a_failing_side_fails_the_calls_that_need_it(
    split_store: tuple[PerSecondStore, RedisServer, RedisServer],
) -> None:
    store, _main, fast = split_store
    fast.kill()
    with pytest.raises(BackendError, match=str(fast.port)):
        await store.increment([Increment("s_a_1", 1, 1, 1), Increment("m_a_1", 1, 60, 60)])
    with pytest.raises(BackendError):
        await store.ping()
    assert await store.increment([Increment("m_b_1", 1, 60, 60)]) == [1]


async def test_both_parts_are_sent_at_once() -> None:
    """Neither side waits for the other: each sees the call before either answers."""
    started: list[str] = []
    both_started, release = asyncio.Event(), asyncio.Event()

    class Gate(OpenMemoryStore):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def increment(self, increments: Any) -> list[int]:
            started.append(self.name)
            if len(started) == 2:
                both_started.set()
            await release.wait()
            return await super().increment(increments)

    store = PerSecondStore(Gate("main"), Gate("fast"))
    call = asyncio.ensure_future(store.increment([Increment("a", 1, 1, 1), Increment("b", 1, 60, 60)]))
    await asyncio.wait_for(both_started.wait(), 5)
    release.set()
    assert await call == [1, 1]
    await store.close()


async def test_settings_open_a_split_store_of_two_redis_types(
    redis_db: RedisServer, redis_cluster: RedisCluster, clock: FakeClock
) -> None:
    redis_cluster.flushall()
    env = {
        "BACKEND_TYPE": "redis",
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": redis_db.url,
        "REDIS_PERSECOND": "true",
        "REDIS_PERSECOND_TYPE": "cluster",
        "REDIS_PERSECOND_URL": redis_cluster.url,
        "USE_STATSD": "false",
    }
    stats = MemoryStats()
    store = await open_store(Settings.from_env(env), clock, stats.scope("ratelimit"))
    try:
        inner = getattr(store, "inner", store)
        assert isinstance(inner, PerSecondStore)
        assert "ClusterStore" in repr(inner.per_second) and "RedisStore" in repr(inner.main)
        limiter = Limiter(store=store, stats=MemoryStats(), options=LimiterOptions(), clock=clock)
        config = load_config([ConfigFile("split.yaml", RULES)])
        request = Request("split", (RequestDescriptor((("fast", "x"),)), RequestDescriptor((("slow", "x"),))))
        remaining = [[s.remaining for s in (await limiter.should_rate_limit(config, request)).statuses] for _ in range(2)]
        assert remaining == [[1, 1], [0, 0]]
        assert keys_of(redis_db) == {"split_slow_x_1699999980"}
        owner = redis_cluster.owner_of("split_fast_x_1700000005")
        with owner.client() as admin:
            assert admin.get("split_fast_x_1700000005") == b"2"
        # Each Redis reports its connections under the reference's scope for it.
        snapshot = stats.snapshot()
        assert snapshot["ratelimit.redis_pool.cx_total"] >= 1
        assert snapshot["ratelimit.redis_per_second_pool.cx_total"] >= 1
        assert snapshot["ratelimit.redis_per_second_pool.cx_active"] >= 1
    finally:
        await store.close()


async def test_open_fails_cleanly_when_the_per_second_redis_is_unreachable(redis_db: RedisServer, clock: FakeClock) -> None:
    env = {
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": redis_db.url,
        "REDIS_PERSECOND": "true",
        "REDIS_PERSECOND_SOCKET_TYPE": "tcp",
        "REDIS_PERSECOND_URL": "127.0.0.1:1",
        "REDIS_STARTUP_INITIAL_INTERVAL": "10ms",
        "REDIS_STARTUP_MAX_ELAPSED_TIME": "30ms",
        "USE_STATSD": "false",
    }
    with pytest.raises(BackendError, match=re.escape("127.0.0.1:1")):
        await open_store(Settings.from_env(env), clock, MemoryStats().scope("ratelimit"))
