"""REDIS_TYPE=sentinel against a real master, replica and sentinel (tests/support/cluster_fixtures.py):
the master is found through the sentinels (a dead one is skipped), both passwords are used and
never shown, and after a failover (SENTINEL FAILOVER) requests recover without restarting."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support.cluster_fixtures import MASTER_NAME, REDIS_PASSWORD, SENTINEL_PASSWORD, SentinelSetup
from support.redis_fixtures import free_port

from ratelimit_svc.backends.redis import open_redis_store
from ratelimit_svc.backends.redis.cluster import ClusterStore
from ratelimit_svc.backends.redis.sentinel import SentinelStore
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.settings.model import RedisSettings

KEY = "suite_sentinel_1700000000"


def settings(url: str, **options: Any) -> RedisSettings:
    options = {"auth": REDIS_PASSWORD, "sentinel_auth": SENTINEL_PASSWORD, **options}
    return RedisSettings(type="sentinel", url=url, **options)


@pytest.fixture
async def make_store() -> AsyncIterator[Callable[..., SentinelStore]]:
    stores: list[SentinelStore] = []

    def make(cfg: RedisSettings, op_timeout: float = 2.0) -> SentinelStore:
        store = SentinelStore(cfg, op_timeout=op_timeout)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_failover_is_recovered_without_a_restart(
    redis_sentinel_factory: Callable[[], SentinelSetup], make_store: Callable[..., SentinelStore]
) -> None:
    setup = redis_sentinel_factory()
    store = make_store(settings(setup.url, pool_size=3), op_timeout=1.0)
    # Fill the pool: every pooled connection points at the old master.
    await asyncio.gather(*(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(3)))
    old = setup.current_master()
    with old.client() as client:
        assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has the counter

    new = setup.failover()
    assert new is not old

    # Until the sentinel demotes the old master, it still takes writes (and loses them when it
    # resyncs: asynchronous replication); then its pooled connections get READONLY, are closed,
    # and new ones go to the master the sentinel names. Poll until a call lands on the new one.
    failures = 0
    deadline = time.monotonic() + 15
    while True:
        assert time.monotonic() < deadline, "requests never reached the new master"
        try:
            (value,) = await store.increment([Increment(KEY, 1, 60, 60)])
        except BackendError:
            failures += 1
        else:
            with new.client() as client:
                if int(client.get(KEY) or 0) == value:
                    break
        await asyncio.sleep(0.02)
    assert value >= 4  # the replica had the first three
    # Every later call goes to the new master.
    results = await asyncio.gather(*(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(6)))
    assert sorted(r[0] for r in results) == [value + n for n in range(1, 7)]
    with new.client() as client:
        assert client.get(KEY) == str(value + 6).encode()
    assert failures <= 3  # at most once per pooled connection
    assert store.switches_seen == 1  # +switch-master closed the old master's connections


async def test_a_dead_master_fails_fast_until_one_is_back(
    redis_sentinel_factory: Callable[[], SentinelSetup], make_store: Callable[..., SentinelStore]
) -> None:
    setup = redis_sentinel_factory()
    store = make_store(settings(setup.url), op_timeout=2.0)
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
    setup.master.kill()
    started = time.monotonic()
    with pytest.raises(BackendError, match=f"^redis: .*{MASTER_NAME}"):
        await store.increment([Increment(KEY, 1, 60, 60)])
    assert time.monotonic() - started < 1.0
    setup.master.restart()  # empty: no persistence
    deadline = time.monotonic() + 10
    while True:
        try:
            assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
            break
        except BackendError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_a_dead_sentinel_in_the_list_is_skipped(
    redis_sentinel: SentinelSetup, make_store: Callable[..., SentinelStore]
) -> None:
    redis_sentinel.flushall()
    assert redis_sentinel.sentinel is not None
    store = make_store(settings(f"{MASTER_NAME},127.0.0.1:1,{redis_sentinel.sentinel.url}"))
    await store.ping()
    assert await store.increment([Increment(KEY, 2, 60, 60)]) == [2]


async def test_closing_a_subscribed_store_leaves_no_exception_behind(
    redis_sentinel: SentinelSetup, make_store: Callable[..., SentinelStore]
) -> None:
    """Closing cancels the +switch-master subscription. Compiled, its cleanup once awaited in a
    finally, which left the cancellation behind as the thread's handled exception; the next
    compiled await in a finally (a cluster's slot-map refresh) raised it, so a startup PING
    failed with CancelledError instead of BackendError (docs/performance.md, Compiled modules)."""
    redis_sentinel.flushall()
    assert redis_sentinel.sentinel is not None
    store = make_store(settings(redis_sentinel.url))
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
    with redis_sentinel.sentinel.client() as sentinel:
        deadline = time.monotonic() + 10
        while not any(int(c.get("sub", 0)) for c in sentinel.client_list()):
            assert time.monotonic() < deadline, "the store never subscribed to +switch-master"
            await asyncio.sleep(0.02)
    await store.close()
    assert sys.exc_info() == (None, None, None)
    cluster = ClusterStore(
        RedisSettings(type="cluster", url=f"127.0.0.1:{free_port()}"), op_timeout=1.0
    )
    try:
        with pytest.raises(BackendError, match="CLUSTER SLOTS"):
            await cluster.ping()
    finally:
        await cluster.close()


@pytest.mark.parametrize(
    ("field", "secret"),
    [("sentinel_auth", "wrong-sentinel-secret"), ("auth", "wrong-redis-secret"), ("auth", "bob:wrong-user-secret")],
)
async def test_wrong_credentials_fail_without_showing_them(
    field: str, secret: str, redis_sentinel: SentinelSetup, caplog: pytest.LogCaptureFixture
) -> None:
    async def sleep(_: float) -> None:
        return None

    with pytest.raises(BackendError) as caught:
        await open_redis_store(
            settings(redis_sentinel.url, **{field: secret}),
            op_timeout=10.0,  # generous: a timed-out attempt under load would hide the auth error
            startup_initial_interval=0.01,
            startup_max_interval=0.01,
            startup_max_elapsed=0.02,
            sleep=sleep,
        )
    message = str(caught.value)
    assert message.startswith("redis: ")
    assert "AuthenticationError" in message or "invalid username-password" in message, message
    for text in (message, caplog.text):
        assert secret not in text
        assert secret.rpartition(":")[2] not in text


@pytest.mark.parametrize("url", ["mymaster", "mymaster,", ",127.0.0.1:26379", "mymaster,nohost"])
def test_invalid_urls(url: str) -> None:
    with pytest.raises(BackendError, match="REDIS_URL"):
        SentinelStore(RedisSettings(type="sentinel", url=url), op_timeout=1.0)


def test_repr_names_master_and_sentinels_and_never_the_credentials() -> None:
    store = SentinelStore(
        RedisSettings(type="sentinel", url="mymaster,10.0.0.1:26379,10.0.0.2:26379", auth="pw1", sentinel_auth="u:pw2"),
        op_timeout=1.0,
    )
    text = repr(store)
    assert text == "SentinelStore(sentinel mymaster@10.0.0.1:26379,10.0.0.2:26379)"
