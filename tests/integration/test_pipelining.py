"""Cross-request pipelining (REDIS_PIPELINE_WINDOW, REDIS_PIPELINE_LIMIT): the Coalescer alone with
a fake send, then a real Redis and a real cluster — N concurrent requests make one write (one per
node), every caller gets exactly its own replies, errors and timeouts reach every caller, and a
caller cancelled before the flush sends nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from support.cluster_fixtures import RedisCluster
from support.redis_fixtures import RedisServer

from ratelimit_svc.backends.redis import create_redis_store
from ratelimit_svc.backends.redis.connection import CommandStore
from ratelimit_svc.backends.redis.pipelining import Coalescer
from ratelimit_svc.backends.redis.single import RedisStore
from ratelimit_svc.errors import BackendError, CounterError
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.settings.model import RedisSettings

KEY = "suite_pipelined_1700000000"


class FakeSend:
    """Answers each command with its position in the batch; records the batches."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.error = error

    async def __call__(self, commands: Sequence[Any]) -> list[Any]:
        self.batches.append(list(commands))
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return [f"reply:{command[1]}" for command in commands]




@pytest.fixture
async def make_store() -> AsyncIterator[Callable[..., CommandStore]]:
    stores: list[CommandStore] = []

    def make(cfg: RedisSettings, op_timeout: float = 2.0) -> CommandStore:
        store = create_redis_store(cfg, op_timeout=op_timeout)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def commands(name: str, count: int) -> list[tuple[str, str]]:
    return [("CMD", f"{name}{i}") for i in range(count)]


# -- the Coalescer alone -------------------------------------------------------------------------


async def test_concurrent_callers_share_one_send_and_get_their_own_replies() -> None:
    send = FakeSend()
    coalescer = Coalescer(send, window=0.01)
    results = await asyncio.gather(*(coalescer.submit(commands(f"c{n}-", n + 1)) for n in range(5)))
    assert len(send.batches) == 1
    assert len(send.batches[0]) == 1 + 2 + 3 + 4 + 5
    for n, replies in enumerate(results):
        assert replies == [f"reply:c{n}-{i}" for i in range(n + 1)]
    await coalescer.close()


async def test_the_limit_flushes_early_and_keeps_each_callers_commands_together() -> None:
    send = FakeSend()
    coalescer = Coalescer(send, window=10.0, limit=4)  # the window never fires in this test
    results = await asyncio.gather(*(coalescer.submit(commands(f"c{n}-", 3)) for n in range(4)))
    assert [len(batch) for batch in send.batches] == [6, 6]  # flushed at 6 >= 4 commands
    assert all(replies == [f"reply:c{n}-{i}" for i in range(3)] for n, replies in enumerate(results))
    await coalescer.close()


async def test_a_failed_send_fails_every_caller_with_its_own_error() -> None:
    coalescer = Coalescer(FakeSend(error=BackendError("redis: boom")), window=0.01)
    outcomes = await asyncio.gather(*(coalescer.submit(commands("x", 1)) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, BackendError) and str(o) == "redis: boom" for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3
    await coalescer.close()


async def test_a_caller_cancelled_before_the_flush_sends_nothing() -> None:
    send = FakeSend()
    coalescer = Coalescer(send, window=0.05)
    cancelled = asyncio.ensure_future(coalescer.submit(commands("gone", 2)))
    kept = asyncio.ensure_future(coalescer.submit(commands("kept", 1)))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert await kept == ["reply:kept0"]
    assert send.batches == [[("CMD", "kept0")]]
    await coalescer.close()


async def test_close_sends_what_is_queued_then_refuses() -> None:
    send = FakeSend()
    coalescer = Coalescer(send, window=10.0)
    pending = asyncio.ensure_future(coalescer.submit(commands("q", 1)))
    await asyncio.sleep(0)
    await coalescer.close()
    assert await pending == ["reply:q0"]
    with pytest.raises(BackendError, match="closed"):
        await coalescer.submit(commands("late", 1))


# -- a real Redis ----------------------------------------------------------------------------------


async def test_n_concurrent_requests_make_one_round_trip(
    redis_db: RedisServer, make_store: Callable[..., CommandStore], socket_writes: list[bytes]
) -> None:
    store = make_store(RedisSettings(socket_type="tcp", url=redis_db.url, pipeline_window=0.005))
    await store.ping()
    with redis_db.client() as admin:
        calls_before = admin.info("commandstats").get("cmdstat_incrby", {}).get("calls", 0)
    socket_writes.clear()

    results = await asyncio.gather(*(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(50)))

    assert sorted(r[0] for r in results) == list(range(1, 51))
    assert len(socket_writes) == 1  # 100 commands, one write
    assert socket_writes[0].count(b"INCRBY") == 50 and socket_writes[0].count(b"EXPIRE") == 50
    with redis_db.client() as admin:
        stats = admin.info("commandstats")
    assert stats["cmdstat_incrby"]["calls"] - calls_before == 50


async def test_limit_splits_batches(
    redis_db: RedisServer, make_store: Callable[..., CommandStore], socket_writes: list[bytes]
) -> None:
    store = make_store(RedisSettings(socket_type="tcp", url=redis_db.url, pipeline_window=0.02, pipeline_limit=8))
    await store.ping()
    socket_writes.clear()
    results = await asyncio.gather(*(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(10)))
    assert sorted(r[0] for r in results) == list(range(1, 11))
    assert isinstance(store, RedisStore) and store._coalescer is not None
    assert store._coalescer.batches_sent == 3  # 4 + 4 (each at the limit of 8 commands) + 2
    # The two batches flushed at the limit in one loop turn share the connection's one write.
    assert sorted(w.count(b"INCRBY") for w in socket_writes if b"INCRBY" in w) == [2, 8]


async def test_an_error_reply_fails_only_the_request_it_belongs_to(
    redis_db: RedisServer, make_store: Callable[..., CommandStore]
) -> None:
    store = make_store(RedisSettings(socket_type="tcp", url=redis_db.url, pipeline_window=0.005))
    with redis_db.client() as admin:
        admin.lpush("a_list", "x")
    outcomes = await asyncio.gather(
        store.increment([Increment(KEY, 1, 60, 60)]),
        store.increment([Increment("a_list", 1, 60, 60)]),
        store.increment([Increment(KEY, 1, 60, 60)]),
        return_exceptions=True,
    )
    assert sorted(o[0] for o in outcomes if isinstance(o, list)) == [1, 2]
    (error,) = [o for o in outcomes if isinstance(o, BaseException)]
    assert isinstance(error, CounterError) and "WRONGTYPE" in str(error)


async def test_a_dead_server_fails_every_waiter(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., CommandStore]
) -> None:
    server = redis_server_factory()
    store = make_store(RedisSettings(socket_type="tcp", url=server.url, pipeline_window=0.005))
    await store.ping()
    server.kill()
    outcomes = await asyncio.gather(
        *(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, BackendError) and str(server.port) in str(o) for o in outcomes), outcomes


async def test_a_hung_server_times_out_every_waiter_within_the_bound(
    redis_db: RedisServer, make_store: Callable[..., CommandStore]
) -> None:
    op_timeout = 0.3
    store = make_store(RedisSettings(socket_type="tcp", url=redis_db.url, pipeline_window=0.005), op_timeout=op_timeout)
    await store.ping()
    redis_db.stop()
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(5)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    finally:
        redis_db.cont()
    assert all(isinstance(o, BackendError) and "no answer" in str(o) for o in outcomes), outcomes
    assert elapsed < op_timeout + 0.5
    assert await store.increment([Increment("fresh_1", 3, 60, 60)]) == [3]


async def test_a_cancelled_request_is_not_sent(
    redis_db: RedisServer, make_store: Callable[..., CommandStore]
) -> None:
    store = make_store(RedisSettings(socket_type="tcp", url=redis_db.url, pipeline_window=0.05))
    gone = asyncio.ensure_future(store.increment([Increment("suite_gone_1", 1, 60, 60)]))
    kept = asyncio.ensure_future(store.increment([Increment(KEY, 1, 60, 60)]))
    await asyncio.sleep(0)
    gone.cancel()
    assert await kept == [1]
    with redis_db.client() as admin:
        assert admin.exists("suite_gone_1") == 0


# -- a real cluster --------------------------------------------------------------------------------


async def test_cluster_one_write_per_node_for_many_concurrent_requests(
    redis_cluster: RedisCluster, make_store: Callable[..., CommandStore], socket_writes: list[bytes]
) -> None:
    redis_cluster.flushall()
    store = make_store(RedisSettings(type="cluster", url=redis_cluster.url, pipeline_window=0.005))
    await store.ping()
    socket_writes.clear()
    keys = [f"suite_spread_{i}_1" for i in range(60)]

    results = await asyncio.gather(*(store.increment([Increment(key, 2, 60, 60)]) for key in keys))

    assert results == [[2]] * len(keys)
    assert len(socket_writes) == len(redis_cluster.masters)
    assert sum(w.count(b"INCRBY") for w in socket_writes) == len(keys)


def test_single_store_without_a_window_has_no_coalescer() -> None:
    store = RedisStore(RedisSettings(socket_type="tcp", url="127.0.0.1:1", pipeline_limit=5), op_timeout=1.0)
    assert store._coalescer is None  # REDIS_PIPELINE_LIMIT alone does not turn it on (radix)
