"""REDIS_TYPE=cluster against real Redis Clusters (tests/support/cluster_fixtures.py): one pipeline per
node, sent concurrently; MOVED and ASK during a slot migration; a hung or dead node fails only its
own keys, fast, naming the node; and a failover (a master killed, its replica promoted by the
cluster) is recovered from without restarting the store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.crc import key_slot
from support.cluster_fixtures import RedisCluster, wait_for

from ratelimit_svc.backends import open_store
from ratelimit_svc.backends.redis.cluster import ClusterStore, parse_cluster_slots
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.settings.model import RedisSettings, Settings
from ratelimit_svc.stats.registry import MemoryStats


@pytest.fixture
async def make_store() -> AsyncIterator[Callable[..., ClusterStore]]:
    stores: list[ClusterStore] = []

    def make(url: str, op_timeout: float = 2.0, **options: Any) -> ClusterStore:
        store = ClusterStore(RedisSettings(type="cluster", url=url, **options), op_timeout=op_timeout)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()



def keys_on_every_node(cluster: RedisCluster, prefix: str, per_node: int = 4) -> dict[int, list[str]]:
    """``per_node`` keys for each master, by port."""
    found: dict[int, list[str]] = {node.port: [] for node in cluster.masters}
    i = 0
    while any(len(keys) < per_node for keys in found.values()):
        key = f"{prefix}_{i}_1700000000"
        port = cluster.owner_of(key).port
        if len(found[port]) < per_node:
            found[port].append(key)
        i += 1
    return found


async def test_one_pipeline_per_node_sent_concurrently(
    redis_cluster: RedisCluster, make_store: Callable[..., ClusterStore], socket_writes: list[bytes]
) -> None:
    redis_cluster.flushall()
    store = make_store(redis_cluster.url)
    await store.ping()  # the map is read and every primary's connection is open
    by_node = keys_on_every_node(redis_cluster, "grouped")
    keys = [key for keys in zip(*by_node.values(), strict=True) for key in keys]  # interleaved
    before = {node.port: redis_cluster.command_calls(node, "incrby") for node in redis_cluster.masters}
    socket_writes.clear()

    values = await store.increment([Increment(key, n + 1, 60, 60) for n, key in enumerate(keys)])

    assert values == [n + 1 for n in range(len(keys))]
    assert len(socket_writes) == len(redis_cluster.masters)  # one write per node
    for write in socket_writes:
        owners = {port for port, node_keys in by_node.items() for key in node_keys if key.encode() in write}
        assert len(owners) == 1  # each write holds one node's keys (INCRBY and EXPIRE together)
    for node in redis_cluster.masters:
        assert redis_cluster.command_calls(node, "incrby") - before[node.port] == len(by_node[node.port])
    assert await store.get(keys) == values


async def test_a_slot_migration_is_followed_through_ask_and_moved(
    redis_cluster: RedisCluster, make_store: Callable[..., ClusterStore]
) -> None:
    redis_cluster.flushall()
    store = make_store(redis_cluster.url)
    old_key, new_key = "suite_{migrating}_old_1", "suite_{migrating}_new_1"
    slot = key_slot(old_key.encode())
    source = redis_cluster.owner_of(old_key)
    target = next(node for node in redis_cluster.masters if node is not source)
    source_id, target_id = redis_cluster.node_id(source), redis_cluster.node_id(target)
    assert await store.increment([Increment(old_key, 5, 60, 60)]) == [5]

    with target.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    with source.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    try:
        # The slot is half-way: keys still on the source are served there; a new key is sent to
        # the target with ASK, every time, and the slot map does not change.
        assert await store.increment([Increment(old_key, 1, 60, 60), Increment(new_key, 2, 60, 60)]) == [6, 2]
        assert await store.increment([Increment(new_key, 2, 60, 60)]) == [4]
        with target.client() as client:
            client.execute_command("ASKING")
            assert client.get(new_key) == b"4"
        assert store.node_for_key(new_key) == source.url

        with source.client() as client:
            client.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", old_key)
    finally:
        for node in redis_cluster.masters:
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    # The source now answers MOVED: the store follows it and remembers the new owner.
    assert await store.increment([Increment(old_key, 1, 60, 60)]) == [7]
    assert store.node_for_key(old_key) == target.url
    assert await store.get([old_key, new_key]) == [7, 4]


async def test_a_hung_node_times_out_alone_and_no_stale_reply_is_read_later(
    redis_cluster: RedisCluster, make_store: Callable[..., ClusterStore]
) -> None:
    redis_cluster.flushall()
    op_timeout = 0.3
    store = make_store(redis_cluster.url, op_timeout=op_timeout, pool_size=1)
    by_node = keys_on_every_node(redis_cluster, "hung", per_node=1)
    hung, *others = redis_cluster.masters
    hung_key = by_node[hung.port][0]
    other_key = by_node[others[0].port][0]
    assert await store.increment([Increment(hung_key, 1, 60, 60), Increment(other_key, 1, 60, 60)]) == [1, 1]

    hung.stop()
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match=f"no answer from {hung.url} within 0.3s"):
            await store.increment([Increment(hung_key, 1, 60, 60)])
        assert time.monotonic() - started < op_timeout + 0.5
        # The other slots keep serving meanwhile.
        assert await store.increment([Increment(other_key, 1, 60, 60)]) == [2]
    finally:
        hung.cont()

    # The stuck INCRBY may or may not have been applied; its reply must never reach this call.
    with hung.client() as client:
        stored = int(client.get(hung_key))
    assert stored in (1, 2)
    assert await store.increment([Increment(hung_key, 10, 60, 60)]) == [stored + 10]


async def test_a_dead_seed_is_skipped(redis_cluster: RedisCluster, make_store: Callable[..., ClusterStore]) -> None:
    redis_cluster.flushall()
    store = make_store(f"127.0.0.1:1,{redis_cluster.url}")
    await store.ping()
    assert await store.increment([Increment("suite_seeded_1", 1, 60, 60)]) == [1]
    assert store.primaries() == sorted(node.url for node in redis_cluster.masters)


async def test_failover_is_recovered_without_a_restart(
    redis_cluster_factory: Callable[..., RedisCluster], make_store: Callable[..., ClusterStore]
) -> None:
    cluster = redis_cluster_factory(masters=3, replicas=1, node_timeout_ms=1000)
    store = make_store(cluster.url, op_timeout=0.5)
    by_node = keys_on_every_node(cluster, "failover", per_node=1)
    master = cluster.masters[0]
    (replica,) = cluster.replicas_of(master)
    key, other_key = by_node[master.port][0], by_node[cluster.masters[1].port][0]
    assert await store.increment([Increment(key, 3, 60, 60), Increment(other_key, 1, 60, 60)]) == [3, 1]
    cluster.wait_replicated(master)

    master.kill()
    started = time.monotonic()
    with pytest.raises(BackendError, match=master.url):
        await store.increment([Increment(key, 1, 60, 60)])
    assert time.monotonic() - started < 0.5  # refused at once: no waiting for the timeout
    # Per slot: the other masters keep serving while this one is down.
    assert await store.increment([Increment(other_key, 1, 60, 60)]) == [2]

    failures = 0
    deadline = time.monotonic() + 20
    while True:  # the cluster promotes the replica after its node timeout; poll until then
        try:
            values = await store.increment([Increment(key, 1, 60, 60)])
            break
        except BackendError:
            failures += 1
            assert time.monotonic() < deadline, "requests never recovered after the failover"
            await asyncio.sleep(0.05)
    assert values == [4]  # the replica had the counter
    assert store.node_for_key(key) == replica.url
    assert await store.get([key, other_key]) == [4, 2]
    wait_for(cluster.healthy, "the cluster to settle")


async def test_backend_table_opens_a_cluster_store_behind_the_breaker(
    redis_cluster: RedisCluster, clock: Any
) -> None:
    settings = Settings.from_env(
        {"BACKEND_TYPE": "redis", "REDIS_TYPE": "cluster", "REDIS_URL": redis_cluster.url, "USE_STATSD": "false"}
    )
    store = await open_store(settings, clock, MemoryStats().scope("ratelimit"))
    try:
        assert "ClusterStore" in repr(getattr(store, "inner", store))
        assert await store.increment([Increment("suite_table_1", 2, 60, 60)]) == [2]
        await store.ping()
    finally:
        await store.close()


def test_parse_cluster_slots() -> None:
    reply = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
        [5461, 10922, [b"", 7001, b"id2"]],  # an empty host: the node that was asked
        [10923, 16383, [b"?", 7002, b"id3"]],  # an unknown endpoint: not usable
    ]
    slots = parse_cluster_slots(reply, "10.0.0.9")
    assert slots[0] == slots[5460] == "10.0.0.1:7000"
    assert slots[5461] == slots[10922] == "10.0.0.9:7001"
    assert slots[10923] is None and slots[16383] is None


@pytest.mark.parametrize("url", ["", "a:b", "127.0.0.1:7000,:1"])
def test_invalid_seed_lists(url: str) -> None:
    with pytest.raises(BackendError, match="invalid REDIS_URL"):
        ClusterStore(RedisSettings(type="cluster", url=url), op_timeout=1.0)


def test_repr_names_the_seeds_and_never_the_credentials() -> None:
    store = ClusterStore(RedisSettings(type="cluster", url="10.0.0.1:7000,10.0.0.2:7000", auth="u:hunter2"), op_timeout=1)
    assert repr(store) == "ClusterStore(cluster 10.0.0.1:7000,10.0.0.2:7000)"
