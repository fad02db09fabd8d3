"""Backend faults (docs/reliability.md (When the backend fails)): the circuit breaker and in-flight bound on their own, then real Redis
servers killed, hung (SIGSTOP), slowed by a delaying proxy, restarted and failed over, seen
through the real gRPC service. Every request must answer within REDIS_OP_TIMEOUT plus a small
margin, with UNAVAILABLE while the backend is bad; nothing may pile up; and the service must
recover by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.clock import FakeClock
from support.fault_proxy import DelayProxy
from support.redis_fixtures import HOST, RedisServer

from ratelimit_svc import backends
from ratelimit_svc.app import App
from ratelimit_svc.backends.breaker import BreakerState, CircuitBreakerStore
from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.stats.registry import MemoryStats

OP_TIMEOUT = 0.5
# Scheduling noise on a loaded 2-core CI machine; the bound is OP_TIMEOUT + this.
MARGIN = 0.5
INC = [Increment("k", 1, 60, 60)]


# -- the breaker alone, over a fake store and a fake monotonic clock -----------------------------


class FakeStore:
    """Answers at once, or fails with ``error``, or waits for ``gate`` first."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def _call(self) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        await self._call()
        return [7] * len(increments)

    async def get(self, keys: Sequence[str]) -> list[int]:
        await self._call()
        return [3] * len(keys)

    async def ping(self) -> None:
        await self._call()

    async def close(self) -> None:
        self.closed = True


def breaker(store: FakeStore, clock: FakeClock, **options: Any) -> CircuitBreakerStore:
    settings: dict[str, Any] = {"failure_threshold": 3, "cooldown": 2.0, "max_in_flight": 10}
    settings.update(options)
    return CircuitBreakerStore(store, clock=clock, **settings)


async def fail_times(guarded: CircuitBreakerStore, n: int) -> None:
    for _ in range(n):
        with pytest.raises(BackendError, match="redis down"):
            await guarded.increment(INC)


async def test_passes_calls_and_answers_through(clock: FakeClock) -> None:
    store = FakeStore()
    guarded = breaker(store, clock)
    assert await guarded.increment(INC * 2) == [7, 7]
    assert await guarded.get(["a"]) == [3]
    await guarded.ping()
    await guarded.close()
    assert store.calls == 3 and store.closed
    assert guarded.state is BreakerState.CLOSED


async def test_opens_after_threshold_consecutive_failures_and_fails_fast(clock: FakeClock) -> None:
    store = FakeStore()
    guarded = breaker(store, clock)
    store.error = BackendError("redis down")
    await fail_times(guarded, 2)
    store.error = None
    await guarded.increment(INC)  # a success resets the count
    store.error = BackendError("redis down")
    await fail_times(guarded, 2)
    assert guarded.state is BreakerState.CLOSED
    await fail_times(guarded, 1)
    assert guarded.state is BreakerState.OPEN
    calls = store.calls
    for operation in (guarded.increment(INC), guarded.get(["a"]), guarded.ping()):
        with pytest.raises(BackendError) as caught:
            await operation
        assert str(caught.value).startswith("circuit open after 3 consecutive backend failures")
        assert "retrying in 2.0s" in str(caught.value)
        assert "last error: redis down" in str(caught.value)
    assert store.calls == calls, "an open circuit must not touch the backend"
    assert guarded.breaker_stats() == {
        "open": 1, "in_flight": 0, "opened_total": 1, "rejected_total": 3, "overloaded_total": 0,
    }  # fmt: skip


async def test_one_probe_after_the_cooldown_closes_on_success(clock: FakeClock) -> None:
    store = FakeStore()
    guarded = breaker(store, clock)
    store.error = BackendError("redis down")
    await fail_times(guarded, 3)
    clock.advance(1.9)
    with pytest.raises(BackendError, match=r"circuit open .*retrying in 0\.1s"):
        await guarded.increment(INC)
    clock.advance(0.1)
    store.error = None
    store.gate = asyncio.Event()
    probe = asyncio.create_task(guarded.increment(INC))
    await asyncio.sleep(0)
    assert guarded.state is BreakerState.HALF_OPEN
    with pytest.raises(BackendError, match="a probe is in flight"):
        await guarded.get(["a"])  # only one probe at a time
    store.gate.set()
    assert await probe == [7]
    assert guarded.state is BreakerState.CLOSED
    assert await guarded.get(["a"]) == [3]


async def test_failed_probe_opens_for_another_cooldown(clock: FakeClock) -> None:
    store = FakeStore()
    guarded = breaker(store, clock)
    store.error = BackendError("redis down")
    await fail_times(guarded, 3)
    clock.advance(2.0)
    await fail_times(guarded, 1)  # the probe
    assert guarded.state is BreakerState.OPEN
    with pytest.raises(BackendError, match=r"retrying in 2\.0s"):
        await guarded.increment(INC)
    assert guarded.opened_total == 1


async def test_health_ping_reports_the_open_circuit_and_probes_without_traffic(
    clock: FakeClock,
) -> None:
    store = FakeStore()
    guarded = breaker(store, clock)
    store.error = BackendError("redis down")
    await fail_times(guarded, 3)
    with pytest.raises(BackendError, match="circuit open"):
        await guarded.ping()
    clock.advance(2.0)
    store.error = None
    await guarded.ping()  # the health check's PING is the probe
    assert guarded.state is BreakerState.CLOSED


async def test_cancelled_calls_count_neither_way_but_a_cancelled_probe_reopens(
    clock: FakeClock,
) -> None:
    store = FakeStore()
    guarded = breaker(store, clock)
    store.gate = asyncio.Event()
    for _ in range(5):  # callers giving up (short gRPC deadlines) do not open the circuit
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                await guarded.increment(INC)
    assert guarded.state is BreakerState.CLOSED and guarded.in_flight == 0
    store.gate = None
    store.error = BackendError("redis down")
    await fail_times(guarded, 3)
    clock.advance(2.0)
    store.gate = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.001):
            await guarded.increment(INC)
    assert guarded.state is BreakerState.OPEN
    with pytest.raises(BackendError, match=r"the probe ended without an answer \(cancelled\)"):
        await guarded.increment(INC)


async def test_a_probe_that_raises_something_else_never_leaves_the_circuit_half_open(
    clock: FakeClock,
) -> None:
    store = FakeStore()
    guarded = breaker(store, clock)
    store.error = BackendError("redis down")
    await fail_times(guarded, 3)
    clock.advance(2.0)
    store.error = RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        await guarded.increment(INC)
    assert guarded.state is BreakerState.OPEN
    clock.advance(2.0)
    store.error = None
    assert await guarded.increment(INC) == [7]
    assert guarded.state is BreakerState.CLOSED


async def test_in_flight_bound_sheds_load_at_once_without_opening(clock: FakeClock) -> None:
    store = FakeStore()
    guarded = breaker(store, clock, max_in_flight=4)
    store.gate = asyncio.Event()
    waiting = [asyncio.create_task(guarded.increment(INC)) for _ in range(4)]
    await asyncio.sleep(0)
    assert guarded.in_flight == 4
    for _ in range(10):
        with pytest.raises(BackendError, match=r"backend overloaded: 4 calls .*MAX_IN_FLIGHT=4"):
            await guarded.get(["a"])
    store.gate.set()
    # the health check is not load: a PING is never shed
    await guarded.ping()
    assert await asyncio.gather(*waiting) == [[7]] * 4
    assert guarded.state is BreakerState.CLOSED
    assert guarded.overloaded_total == 10 and store.calls == 5


async def test_threshold_zero_disables_the_breaker(clock: FakeClock) -> None:
    store = FakeStore()
    guarded = breaker(store, clock, failure_threshold=0, max_in_flight=0)
    store.error = BackendError("redis down")
    await fail_times(guarded, 50)
    assert guarded.state is BreakerState.CLOSED and store.calls == 50


async def test_open_store_guards_redis_and_not_memory(redis_db: RedisServer) -> None:
    env = {"BACKEND_TYPE": "memory"}
    memory = await backends.open_store(Settings.from_env(env), time.time, MemoryStats().scope("x"))
    assert isinstance(memory, MemoryStore)
    await memory.close()
    env = {
        "BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": redis_db.url,
        "BREAKER_FAILURE_THRESHOLD": "7", "BREAKER_COOLDOWN": "1500ms",
        "BACKEND_MAX_IN_FLIGHT": "33",
    }  # fmt: skip
    stats = MemoryStats()
    redis_store = await backends.open_store(Settings.from_env(env), time.time, stats.scope("ratelimit"))
    try:
        assert isinstance(redis_store, CircuitBreakerStore)
        assert (redis_store.failure_threshold, redis_store.cooldown) == (7, 1.5)
        assert redis_store.max_in_flight == 33
        assert await redis_store.increment([Increment("guarded", 2, 60, 60)]) == [2]
        # The wrapped store and the breaker each report into their own scope.
        snapshot = stats.snapshot()
        assert snapshot["ratelimit.redis_pool.cx_total"] >= 1
        assert snapshot["ratelimit.backend_breaker.in_flight"] == 0
        assert snapshot["ratelimit.backend_breaker.open"] == 0
    finally:
        await redis_store.close()


# -- real Redis through the real gRPC service ----------------------------------------------------

RULES = "domain: f\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1000000}\n"


class Starvation:
    """When this event loop ran a 10 ms timer late, and by how much. Time in which the process
    could not run at all (a busy CI machine) delays every answer by that much, whatever the
    service does, so ``timed`` takes it out of the latencies it reports."""

    def __init__(self) -> None:
        self.late: list[tuple[float, float]] = []  # (woke at, overshoot)

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            overshoot = loop.time() - before - 0.01
            if overshoot > 0.001:
                self.late.append((loop.time(), overshoot))

    def during(self, start: float, end: float) -> float:
        """Seconds of [start, end] in which the loop was late."""
        return sum(
            max(0.0, min(woke, end) - max(woke - overshoot, start))
            for woke, overshoot in self.late
        )


STARVATION = Starvation()


@contextlib.asynccontextmanager
async def service(
    tmp_path: Path, redis_url: str, **extra: str
) -> AsyncIterator[tuple[App, rls_pb2_grpc.RateLimitServiceStub]]:
    config_dir = tmp_path / "runtime" / "rl" / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "f.yaml").write_text(RULES)
    env = {
        "BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": redis_url,
        "REDIS_OP_TIMEOUT": f"{int(OP_TIMEOUT * 1000)}ms",
        "GRPC_HOST": HOST, "GRPC_PORT": "0", "PORT": "0", "DEBUG_PORT": "0",
        "HOST": HOST, "DEBUG_HOST": HOST, "USE_STATSD": "false",
        "RUNTIME_ROOT": str(tmp_path / "runtime"), "RUNTIME_SUBDIRECTORY": "rl",
        "EXPIRATION_JITTER_MAX_SECONDS": "0", "BREAKER_FAILURE_THRESHOLD": "3",
        "BREAKER_COOLDOWN": "200ms",
    }  # fmt: skip
    env.update(extra)
    STARVATION.late.clear()
    watcher = asyncio.get_running_loop().create_task(STARVATION.watch())
    try:
        async with App(Settings.from_env(env)) as app:
            assert app.grpc is not None
            async with grpc.aio.insecure_channel(f"{HOST}:{app.grpc.port}") as channel:
                yield app, rls_pb2_grpc.RateLimitServiceStub(channel)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def request(value: str = "v") -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor()
    d.entries.add(key="k", value=value)
    return rls_pb2.RateLimitRequest(domain="f", descriptors=[d])


async def timed(
    stub: rls_pb2_grpc.RateLimitServiceStub, value: str = "v"
) -> tuple[float, grpc.StatusCode, str]:
    """(seconds, status code, details); the client's own deadline is far beyond the bound.
    ``seconds`` leaves out the time this process was starved of CPU meanwhile (``Starvation``)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        response = await stub.ShouldRateLimit(request(value), timeout=10)
        code, details = grpc.StatusCode.OK, ""
        assert response.overall_code == rls_pb2.RateLimitResponse.OK
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    ended = loop.time()
    return ended - started - STARVATION.during(started, ended), code, details


async def until_ok(stub: rls_pb2_grpc.RateLimitServiceStub, within: float = 10.0) -> int:
    """Ask until an answer is OK (every answer bounded); returns how many failed before."""
    deadline = time.monotonic() + within
    failed = 0
    while time.monotonic() < deadline:
        seconds, code, details = await timed(stub)
        assert seconds < OP_TIMEOUT + MARGIN, (seconds, details)
        if code is grpc.StatusCode.OK:
            return failed
        assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
        failed += 1
        await asyncio.sleep(0.05)
    raise AssertionError(f"no recovery within {within}s")


def assert_all_unavailable_in_time(answers: list[tuple[float, grpc.StatusCode, str]]) -> None:
    for seconds, code, details in answers:
        assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
        assert seconds < OP_TIMEOUT + MARGIN, (seconds, details)


async def test_killed_redis_fails_fast_then_recovers_after_restart(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    server: RedisServer = redis_server_factory()
    async with service(tmp_path, server.url, BREAKER_COOLDOWN="1s") as (app, stub):
        assert (await timed(stub))[1] is grpc.StatusCode.OK
        server.kill()
        answers = [await timed(stub) for _ in range(5)]
        answers += await asyncio.gather(*(timed(stub) for _ in range(50)))
        assert_all_unavailable_in_time(answers)
        assert any(d.startswith("circuit open") for _, _, d in answers)
        assert isinstance(app.store, CircuitBreakerStore)
        assert app.store.state is not BreakerState.CLOSED
        with pytest.raises(BackendError):
            await app.store.ping()  # what the health check sees (open, or a failing probe)
        server.restart()
        await until_ok(stub)
        assert app.store.state is BreakerState.CLOSED


async def test_hung_redis_answers_in_time_then_fails_fast_then_recovers(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    server: RedisServer = redis_server_factory()
    async with service(
        tmp_path, server.url, BREAKER_COOLDOWN="2s", BACKEND_MAX_IN_FLIGHT="50"
    ) as (_app, stub):
        assert (await timed(stub))[1] is grpc.StatusCode.OK
        server.stop()
        try:
            answers = await asyncio.gather(*(timed(stub) for _ in range(200)))
            assert_all_unavailable_in_time(answers)
            # Past the first 50 they never waited: shed, or (once 3 failed) the circuit is open.
            kinds = {d.split(":")[0].split(" after")[0] for _, _, d in answers}
            assert kinds <= {"redis", "backend overloaded", "circuit open"}, kinds
            fast = [await timed(stub) for _ in range(20)]  # the circuit is open now
            assert_all_unavailable_in_time(fast)
            assert all(d.startswith("circuit open") for _, _, d in fast)
            assert max(s for s, _, _ in fast) < OP_TIMEOUT
        finally:
            server.cont()
        await until_ok(stub)


def server_rpcs() -> int:
    """grpc.aio server calls in progress in this loop (one ``_handle_exceptions`` task each)."""
    return sum(
        getattr(t.get_coro(), "__qualname__", "") == "_handle_exceptions"
        for t in asyncio.all_tasks()
    )


async def hung_open_loop(
    tmp_path: Path, server: RedisServer, cap: int
) -> tuple[list[tuple[float, grpc.StatusCode, str]], int, float, CircuitBreakerStore]:
    """400 requests a second for 1.5 s at a hung Redis, the breaker off so that only the in-flight
    bound (``cap``; 0 = none) protects. Returns the answers, the backend in-flight high-water
    mark, the mean number of server calls in progress, and the store."""
    async with service(
        tmp_path, server.url, BREAKER_FAILURE_THRESHOLD="0", BACKEND_MAX_IN_FLIGHT=str(cap)
    ) as (app, stub):
        guarded = app.store
        assert isinstance(guarded, CircuitBreakerStore)
        assert (await timed(stub))[1] is grpc.StatusCode.OK
        in_flight_high, rpc_samples = 0, []
        pending: set[asyncio.Task[tuple[float, grpc.StatusCode, str]]] = set()
        answers: list[tuple[float, grpc.StatusCode, str]] = []
        server.stop()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            sent = 0
            while (elapsed := loop.time() - started) < 1.5:
                while sent < elapsed * 400:
                    task = loop.create_task(timed(stub, f"v{sent % 50}"))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    task.add_done_callback(lambda t: answers.append(t.result()))
                    sent += 1
                in_flight_high = max(in_flight_high, guarded.in_flight)
                if elapsed > 0.5:  # steady state
                    rpc_samples.append(server_rpcs())
                await asyncio.sleep(0.005)
            await asyncio.gather(*pending)
        finally:
            server.cont()
        assert len(answers) == sent >= 300  # fewer if this machine is busy
        await until_ok(stub)
        return answers, in_flight_high, sum(rpc_samples) / len(rpc_samples), guarded


async def test_hung_redis_under_open_loop_load_bounds_what_is_in_flight(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    cap = 20
    answers, in_flight_high, mean_rpcs, guarded = await hung_open_loop(
        tmp_path, redis_server_factory(), cap
    )
    assert all(code is grpc.StatusCode.UNAVAILABLE for _, code, _ in answers)
    # This test loads the machine itself (client and service share a loop), so answer times are
    # only bounded generously (a busy machine must not fail it); what the bound guarantees is
    # counted below: how many calls wait on the backend at once.
    slowest = max(seconds for seconds, _, _ in answers)
    assert slowest < 10 * (OP_TIMEOUT + MARGIN), slowest
    assert in_flight_high <= cap + 1  # + the health check's PING, never shed
    # Without the bound about 400/s * OP_TIMEOUT = 200 calls wait at once (and with the
    # reference's lack of a timeout, ever more); with it, those beyond the cap are answered at once.
    assert mean_rpcs < cap + 20, mean_rpcs
    assert guarded.overloaded_total > 0 and guarded.in_flight == 0


async def test_slow_redis_behind_a_delaying_proxy(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    server: RedisServer = redis_server_factory()
    proxy = DelayProxy(server.port)
    await proxy.start()
    try:
        async with service(tmp_path, f"{HOST}:{proxy.port}") as (_app, stub):
            proxy.delay = 0.05  # slow but well within the timeout: answers are correct
            for _ in range(3):
                seconds, code, _ = await timed(stub)
                assert code is grpc.StatusCode.OK and seconds >= 0.04
            proxy.delay = OP_TIMEOUT * 2  # too slow
            answers = [await timed(stub) for _ in range(4)]
            answers += await asyncio.gather(*(timed(stub) for _ in range(30)))
            assert_all_unavailable_in_time(answers)
            assert any("no answer from" in d for _, _, d in answers)
            assert any(d.startswith("circuit open") for _, _, d in answers)
            proxy.delay = 0.0
            await until_ok(stub)
            assert [c for _, c, _ in [await timed(stub) for _ in range(5)]] == [grpc.StatusCode.OK] * 5
    finally:
        await proxy.close()


async def test_restart_while_idle_is_invisible(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    server: RedisServer = redis_server_factory()
    async with service(tmp_path, server.url) as (_, stub):
        for _ in range(3):
            assert (await timed(stub))[1] is grpc.StatusCode.OK
        server.restart()
        # The pooled sockets are dead; the pool notices before using them.
        assert (await timed(stub))[1] is grpc.StatusCode.OK


async def test_failover_to_another_server_recovers_without_restart(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    primary: RedisServer = redis_server_factory()
    replica: RedisServer = redis_server_factory()
    proxy = DelayProxy(primary.port)
    await proxy.start()
    try:
        async with service(tmp_path, f"{HOST}:{proxy.port}") as (_, stub):
            assert (await timed(stub))[1] is grpc.StatusCode.OK
            primary.kill()
            proxy.drop()  # the old primary's connections die with it
            answers = [await timed(stub) for _ in range(4)]
            assert_all_unavailable_in_time(answers)
            proxy.upstream_port = replica.port  # the address now leads to the new primary
            await until_ok(stub)
        with replica.client() as client:
            assert client.keys("f_k_v_*"), "the counter now lives on the new primary"
    finally:
        await proxy.close()
