"""Redis errors through the real service (docs/backends.md, Error classes and Failover): a key
holding the wrong type fails only its own requests (FAILED_PRECONDITION, its own stat) while other
keys answer and /healthcheck stays 200; a failover behind a stable address (a TCP proxy whose
upstream moves, the old primary demoted to a replica) is recovered without a restart, and a
replica is never reported healthy. Then the client's own reactions: MOVED from a single server resets the connection, and reconnects after a
refused one are spaced and shared."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from support.cluster_fixtures import RedisCluster
from support.fault_proxy import DelayProxy
from support.redis_fixtures import HOST, RedisServer, free_port
from support.service_env import base_env, write_rules
from support.socket_watch import Connect

from ratelimit_svc.app import App
from ratelimit_svc.backends.redis.client import BACKOFF_INITIAL
from ratelimit_svc.backends.redis.single import RedisStore
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.service import STAT_BACKEND_ERROR, STAT_COUNTER_ERROR
from ratelimit_svc.settings.model import RedisSettings, Settings

RULES = "domain: f\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1000000}\n"
CHANGE_TIMEOUT = 15.0  # a health PING a second: seconds, not 15


@contextlib.asynccontextmanager
async def service(
    tmp_path: Path, redis_url: str, **extra: str
) -> AsyncIterator[tuple[App, rls_pb2_grpc.RateLimitServiceStub, aiohttp.ClientSession]]:
    env = base_env(
        **write_rules(tmp_path, RULES), BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp",
        REDIS_URL=redis_url, REDIS_OP_TIMEOUT="1s", BREAKER_FAILURE_THRESHOLD="3",
        BREAKER_COOLDOWN="200ms", **extra,
    )  # fmt: skip
    async with App(Settings.from_env(env)) as app:
        assert app.grpc is not None and app.http is not None
        async with (
            grpc.aio.insecure_channel(f"{HOST}:{app.grpc.port}") as channel,
            aiohttp.ClientSession(f"http://{HOST}:{app.http.port}") as http,
        ):
            yield app, rls_pb2_grpc.RateLimitServiceStub(channel), http


def request(value: str) -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor()
    d.entries.add(key="k", value=value)
    return rls_pb2.RateLimitRequest(domain="f", descriptors=[d])


async def call(stub: rls_pb2_grpc.RateLimitServiceStub, value: str) -> tuple[grpc.StatusCode, str]:
    try:
        response = await stub.ShouldRateLimit(request(value), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    assert response.overall_code == rls_pb2.RateLimitResponse.OK
    return grpc.StatusCode.OK, ""


async def health(http: aiohttp.ClientSession) -> int:
    async with http.get("/healthcheck") as response:
        return response.status


async def health_becomes(http: aiohttp.ClientSession, status: int) -> None:
    deadline = time.monotonic() + CHANGE_TIMEOUT
    while (current := await health(http)) != status:
        assert time.monotonic() < deadline, f"/healthcheck stayed {current}, expected {status}"
        await asyncio.sleep(0.1)


def hour_keys(value: str) -> list[str]:
    """The counter keys of ``f``/``k``=``value`` for this hour and the next (the test may cross)."""
    start = int(time.time()) // 3600 * 3600
    return [f"f_k_{value}_{start + offset}" for offset in (0, 3600)]


# -- one bad key ---------------------------------------------------------------------------------


async def test_a_poisoned_key_fails_alone_and_health_stays_up(
    tmp_path: Path, redis_db: RedisServer
) -> None:
    with redis_db.client() as admin:
        for key in hour_keys("poison"):
            admin.lpush(key, "not a counter")
    async with service(tmp_path, redis_db.url) as (app, stub, http):
        stop = asyncio.Event()
        poisoned: list[tuple[grpc.StatusCode, str]] = []

        async def hammer() -> None:
            while not stop.is_set():
                poisoned.append(await call(stub, "poison"))

        hammering = asyncio.get_running_loop().create_task(hammer())
        try:
            others: list[grpc.StatusCode] = []
            statuses: list[int] = []
            # Long enough for several health PINGs (one a second) after the breaker's threshold
            # of failures would have been reached many times over.
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                others += [code for code, _ in await asyncio.gather(
                    *(call(stub, f"fine{i}") for i in range(5))
                )]  # fmt: skip
                statuses.append(await health(http))
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await hammering

    assert len(poisoned) >= 20
    assert {code for code, _ in poisoned} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert "'f_k_poison_" in poisoned[0][1] and "WRONGTYPE" in poisoned[0][1]
    assert others and set(others) == {grpc.StatusCode.OK}
    assert statuses and set(statuses) == {200}
    snapshot = app.stats.snapshot()
    assert snapshot[STAT_COUNTER_ERROR] == len(poisoned)
    assert snapshot.get(STAT_BACKEND_ERROR, 0) == 0
    assert snapshot["ratelimit.backend_breaker.opened"] == 0


# -- failover behind a stable address ------------------------------------------------------------


def replicate(replica: RedisServer, primary: RedisServer | None) -> None:
    """REPLICAOF ``primary`` (None: become a primary) and, for a replica, wait for the link."""
    with replica.client() as admin:
        if primary is None:
            admin.replicaof("NO", "ONE")
            return
        admin.replicaof(primary.host, primary.port)
    deadline = time.monotonic() + CHANGE_TIMEOUT
    while True:
        with replica.client() as admin:
            if admin.info("replication").get("master_link_status") == "up":
                return
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)  # replication setup, polled


async def test_failover_behind_a_proxy_recovers_and_a_replica_is_not_healthy(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    old: RedisServer = redis_server_factory()
    new: RedisServer = redis_server_factory()
    replicate(new, old)
    proxy = DelayProxy(old.port)
    await proxy.start()
    try:
        async with service(tmp_path, f"{HOST}:{proxy.port}") as (_, stub, http):
            assert await call(stub, "v") == (grpc.StatusCode.OK, "")

            # Failover: the replica is promoted, the old primary follows it, and the address
            # now leads to the new primary. The open connection still reaches the old one.
            replicate(new, None)
            replicate(old, new)
            proxy.upstream_port = new.port
            failures: list[tuple[grpc.StatusCode, str]] = []
            while (outcome := await call(stub, "v"))[0] is not grpc.StatusCode.OK:
                failures.append(outcome)
                assert len(failures) <= 2, failures
            # (The health probe may meet READONLY first and reset the connection itself.)
            assert all(code is grpc.StatusCode.UNAVAILABLE for code, _ in failures), failures
            assert all("READONLY" in details for _, details in failures), failures
            with new.client() as admin:
                assert sum(int(admin.get(key) or 0) for key in hour_keys("v")) >= 1
            await health_becomes(http, 200)

            # The address leads to a replica alone: the health probe must see it cannot write.
            proxy.upstream_port = old.port
            proxy.drop()
            await health_becomes(http, 500)
            code, details = await call(stub, "v")
            assert code is grpc.StatusCode.UNAVAILABLE and "READONLY" in details, details

            replicate(old, None)  # promoted: healthy again without a restart
            await health_becomes(http, 200)
            assert (await call(stub, "v"))[0] is grpc.StatusCode.OK
    finally:
        await proxy.close()


# -- the client's reactions, on the store itself --------------------------------------------------


async def test_moved_outside_a_cluster_resets_the_connection(redis_cluster: RedisCluster) -> None:
    """A single-server store pointed at one cluster node: a key of another node's slot answers
    MOVED, a reply this connection cannot act on, so it is dropped and the next call reconnects."""
    redis_cluster.flushall()
    node = redis_cluster.masters[0]
    here = next(f"here_{i}" for i in range(1000) if redis_cluster.owner_of(f"here_{i}") is node)
    there = next(
        f"there_{i}" for i in range(1000) if redis_cluster.owner_of(f"there_{i}") is not node
    )
    store = RedisStore(RedisSettings(socket_type="tcp", url=node.url), op_timeout=2.0)
    try:
        assert await store.increment([Increment(here, 1, 60, 60)]) == [1]
        with pytest.raises(BackendError, match="MOVED"):
            await store.increment([Increment(there, 1, 60, 60)])
        assert store.pool_stats() == {"cx_active": 0, "cx_total": 1, "cx_local_close": 1}
        assert await store.increment([Increment(here, 1, 60, 60)]) == [2]
        assert store.pool_stats()["cx_total"] == 2
    finally:
        await store.close()


async def test_reconnects_are_spaced_and_shared(socket_connects: list[Connect]) -> None:
    """Nothing listens: after a refused connect, a burst of calls shares the next attempt (made
    after the backoff), instead of each opening its own."""
    port = free_port()
    store = RedisStore(RedisSettings(socket_type="tcp", url=f"{HOST}:{port}"), op_timeout=2.0)
    try:
        with pytest.raises(BackendError, match=r"refused|Connect call failed"):
            await store.ping()
        refused_by = time.monotonic()  # the backoff runs from the refusal, a moment before
        outcomes = await asyncio.gather(
            *(store.increment([Increment("k", 1, 60, 60)]) for _ in range(20)),
            return_exceptions=True,
        )
    finally:
        await store.close()
    assert all(isinstance(o, BackendError) for o in outcomes), outcomes
    attempts = [c.at for c in socket_connects if c.address == (HOST, port)]
    assert len(attempts) == 2
    assert attempts[1] - refused_by >= BACKOFF_INITIAL * 0.5  # half: the moment may be a few ms
