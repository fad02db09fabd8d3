"""WORKERS: gRPC worker processes sharing GRPC_PORT (workers.py), through the real service process.

The process tests start ``python -m ratelimit_svc`` with WORKERS=2 on a real Redis and check what
an operator relies on: both processes take connections (seen in /proc: which process owns each
established socket), counting stays exact across them, the debug port's stats are the sum of
both, a config edit reaches both, a worker that dies is replaced, and SIGTERM drains everything
with exit 0. The rest are unit tests of the pieces (the worker count, the stats sum, the port).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from support.redis_fixtures import RedisServer
from support.service_env import ServiceProcess, base_env, config_dir_env
from support.xds_server import AdsServer, rate_limit_config, rule

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.workers.aggregation import AggregateStats, Report
from ratelimit_svc.workers.cpu_quota import usable_cpus
from ratelimit_svc.workers.roles import primary_app, worker_main
from ratelimit_svc.workers.supervisor import WorkerPool, reserve_port, worker_count

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
RULES = """
domain: w
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 50}
"""
# grpcio: the primary serves gRPC too; pyvoy: every worker is an Envoy, the primary serves the rest.
READY = re.compile(r"gRPC workers: (\d+) processes share port (\d+) \((?:this one, pid (\d+), and |Envoy \(pyvoy\) pids )([\d, ]+)\)")


# -- the pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"BACKEND_TYPE": "redis"}, usable_cpus()),
        ({"BACKEND_TYPE": "memory"}, 1),
        ({"BACKEND_TYPE": "redis", "GRPC_UDS": "/tmp/rls.sock"}, 1),
        ({"BACKEND_TYPE": "redis", "WORKERS": "3"}, 3),
        ({"BACKEND_TYPE": "memory", "WORKERS": "1"}, 1),
    ],
)
def test_worker_count(env: dict[str, str], expected: int) -> None:
    assert worker_count(Settings.from_env(env)) == expected


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"WORKERS": "2", "BACKEND_TYPE": "memory"}, ["WORKERS=2", "BACKEND_TYPE=memory"]),
        ({"WORKERS": "4", "BACKEND_TYPE": "redis", "GRPC_UDS": "/tmp/x.sock"}, ["WORKERS=4", "GRPC_UDS"]),
    ],
)
def test_settings_refuse_workers_that_cannot_share(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert all(name in str(caught.value) for name in names)


def test_refused_workers_stop_startup_with_one_line() -> None:
    env = {**os.environ, **base_env(WORKERS="2")}
    result = subprocess.run(
        [sys.executable, "-m", "ratelimit_svc"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "BACKEND_TYPE=memory" in result.stderr


def test_reserved_port_is_shared_only_with_reuseport() -> None:
    reservation = reserve_port("127.0.0.1", 0)
    port = reservation.getsockname()[1]
    try:
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        with socket.socket() as sharing:
            sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sharing.bind(("127.0.0.1", port))
            sharing.listen()
            with pytest.raises(SettingsError, match=f"GRPC_PORT 127.0.0.1:{port}"):
                reserve_port("127.0.0.1", port)  # held by a listener: refused, never shared
    finally:
        reservation.close()


def test_aggregate_stats_sum_the_workers_and_the_primary() -> None:
    stats = AggregateStats()
    stats.add("ratelimit_server.ShouldRateLimit.total_requests", 2)
    stats.set_counter("ratelimit.redis_pool.cx_total", 10)  # the primary's own running total
    stats.set_gauge("ratelimit.redis_pool.cx_active", 1)
    stats.merge(
        1,
        {"ratelimit_server.ShouldRateLimit.total_requests": 5, "ratelimit.redis_pool.cx_total": 3,
         "ratelimit.service.rate_limit.w.k.total_hits": 5},
        {"ratelimit.redis_pool.cx_active": 3},
        {"ratelimit_server.ShouldRateLimit.response_time": [1.0, 2.0]},
    )  # fmt: skip
    stats.merge(2, {"ratelimit.service.rate_limit.w.k.total_hits": 1}, {"ratelimit.redis_pool.cx_active": 4}, {})
    stats.set_counter("ratelimit.redis_pool.cx_total", 11)  # the primary's own grew by one
    snapshot = stats.snapshot()
    assert snapshot["ratelimit_server.ShouldRateLimit.total_requests"] == 7
    assert snapshot["ratelimit.service.rate_limit.w.k.total_hits"] == 6
    assert snapshot["ratelimit.redis_pool.cx_total"] == 14
    assert snapshot["ratelimit.redis_pool.cx_active"] == 8
    assert stats.timers["ratelimit_server.ShouldRateLimit.response_time"] == [2, 3.0]
    stats.forget(2)  # worker 2 exited: its open connections are gone, its counts stay
    assert stats.snapshot()["ratelimit.redis_pool.cx_active"] == 4
    assert stats.snapshot()["ratelimit.service.rate_limit.w.k.total_hits"] == 6


def test_aggregate_stats_stay_bounded_by_the_stats_lru_for_ever_new_keys() -> None:
    # Workers report per-key stats for descriptor values never seen again (ids, paths): the
    # primary holds at most max_keys of them, whatever it keeps to add the workers' totals.
    stats = AggregateStats(max_keys=100)

    def merge_keys(first: int, count: int) -> None:
        for n in range(first, first + count):
            stats.merge(1, {f"ratelimit.service.rate_limit.d.user_u{n}.total_hits": 1}, {}, {})

    merge_keys(0, 5_000)  # the LRU is full and the allocator warm
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        merge_keys(5_000, 20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(stats) == 100
    assert grown < 200_000, f"{grown} bytes kept for 20,000 keys the LRU evicted"
    stats.merge(1, {"ratelimit.redis_pool.cx_total": 3}, {}, {})
    stats.set_counter("ratelimit.redis_pool.cx_total", 2)  # a running total: workers' share kept
    assert stats.snapshot()["ratelimit.redis_pool.cx_total"] == 5


def test_report_collects_one_flush() -> None:
    report = Report()
    report.flush_counter("a", 1)
    report.flush_counter("a", 2)
    report.flush_gauge("g", 5)
    report.flush_timer("t", 1.5)
    assert report.take() == ("stats", {"a": 3}, {"g": 5}, {"t": [1.5]})
    assert report.take() == ("stats", {}, {}, {})


# -- the service process --------------------------------------------------------------------------


class Workers:
    """A running WORKERS=2 service: its log, ports and the pids of its two processes."""

    def __init__(self, service: ServiceProcess, grpc_port: int, pids: list[int], config_dir: Path) -> None:
        self.service = service
        self.grpc_port = grpc_port
        self.pids = pids
        self.config_dir = config_dir

    async def ask(self, channels: int = 1, requests: int = 1) -> list[rls_pb2.RateLimitResponse]:
        """``requests`` calls spread over ``channels`` connections; their answers."""
        answers: list[rls_pb2.RateLimitResponse] = []
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own each
        opened = [grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=options) for _ in range(channels)]
        try:
            for n in range(requests):
                stub = rls_pb2_grpc.RateLimitServiceStub(opened[n % channels])
                answers.append(await stub.ShouldRateLimit(request(), timeout=10))
            owners = established_owners(self.grpc_port, self.pids)
        finally:
            for channel in opened:
                await channel.close()
        self.last_owners = owners
        return answers

    async def stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.service.ports['debug']}/stats") as reply:
                text = await reply.text()
        return {name: int(value) for name, value in (line.split(": ") for line in text.splitlines())}

    async def stats_until(self, name: str, value: int) -> dict[str, int]:
        """The debug port's stats once ``name`` reaches ``value`` (workers report every second)."""
        async with asyncio.timeout(10):
            while True:  # polling another process: no event to wait on
                stats = await self.stats()
                if stats.get(name) == value:
                    return stats
                await asyncio.sleep(0.1)


def request() -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor()
    d.entries.add(key="k", value="v")
    return rls_pb2.RateLimitRequest(domain="w", descriptors=[d])


def established_owners(port: int, pids: list[int]) -> dict[int, int]:
    """pid -> how many ESTABLISHED server-side sockets on ``port`` that process holds."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(fields[9])
    owners = {}
    for pid in pids:
        held = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held += 1
        owners[pid] = held
    return owners


@contextlib.asynccontextmanager
async def start_workers(env: dict[str, str], config_dir: Path) -> AsyncIterator[Workers]:
    service = await ServiceProcess.start(env)
    try:
        line = next((line for line in service.lines if "gRPC workers:" in line), None)
        match = READY.search(line or await service.wait_for_line("gRPC workers:"))
        assert match is not None
        pids = [*([int(match[3])] if match[3] else []), *(int(p) for p in match[4].split(", "))]
        yield Workers(service, int(match[2]), pids, config_dir)
    finally:
        if service.process.returncode is None:
            os.killpg(service.process.pid, signal.SIGKILL)  # the primary and its workers
        await service.wait()


def redis_env(redis_db: RedisServer, **extra: str) -> dict[str, str]:
    return base_env(
        BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_db.url, WORKERS="2",
        LOG_LEVEL="INFO", **extra,
    )  # fmt: skip


@pytest.fixture(params=["pyvoy", "grpcio"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def workers(tmp_path: Path, redis_db: RedisServer, transport: str) -> AsyncIterator[Workers]:
    runtime, config_dir = config_dir_env(tmp_path, RULES)
    env = redis_env(redis_db, **runtime, RUNTIME_WATCH_ROOT="false", GRPC_SERVER=transport)
    async with start_workers(env, config_dir) as running:
        yield running


async def test_both_workers_take_connections_and_count_exactly(workers: Workers) -> None:
    codes = [answer.overall_code for answer in await workers.ask(channels=16, requests=60)]
    # 16 connections spread by the kernel over 2 processes: both serve (1 in 2**15 to fail).
    assert all(held > 0 for held in workers.last_owners.values()), workers.last_owners
    assert codes.count(OK) == 50 and codes.count(OVER) == 10  # one Redis counter for both

    stats = await workers.stats_until("ratelimit_server.ShouldRateLimit.total_requests", 60)
    assert stats["ratelimit.service.rate_limit.w.k.total_hits"] == 60
    assert stats["ratelimit.service.rate_limit.w.k.within_limit"] == 50
    assert stats["ratelimit.service.rate_limit.w.k.over_limit"] == 10
    assert stats["ratelimit.service.config_load_success"] == 1  # loaded once, by the primary
    assert stats["ratelimit.redis_pool.cx_active"] >= 2  # at least one connection each


async def test_console_shows_one_backend_line_per_process_and_their_hot_keys(workers: Workers) -> None:
    """docs/console.md (Backend, Hot keys): each worker reports its line to the primary. On
    grpcio the primary serves gRPC too; on pyvoy only the Envoy workers do (docs/transports.md)."""
    pids = {workers.service.process.pid, *workers.pids}  # the primary is one of them on grpcio
    await workers.ask(channels=16, requests=60)  # 50 an hour: the last 10 are over
    async with aiohttp.ClientSession(f"http://127.0.0.1:{workers.service.ports['debug']}") as http:
        async with asyncio.timeout(10):
            while True:  # workers report every second: no event to wait on in another process
                async with http.get("/console/api/backend") as reply:
                    processes = (await reply.json())["processes"]
                calls = sum(p["operations"]["increment"]["calls"] for p in processes)
                if len(processes) == len(pids) and calls == 60:
                    break
                await asyncio.sleep(0.1)
        roles = ["primary", *(f"worker {n}" for n in range(1, len(processes)))]
        assert [p["role"] for p in processes] == roles
        assert {p["pid"] for p in processes} == pids
        assert all(p["breaker"]["state"] == "closed" and p["pool"]["cx_active"] >= 1 for p in processes)
        grpc_servers = [p for p in processes if p["pid"] in workers.pids]
        assert len(grpc_servers) == 2 and all(p["operations"]["increment"]["calls"] > 0 for p in grpc_servers)
        async with http.get("/console/api/hot-keys") as reply:
            keys = (await reply.json())["keys"]
    assert [(k["descriptor"], k["count"], k["limit"], k["over"]) for k in keys] == [
        ([{"key": "k", "value": "v"}], 60, 50, True)
    ]


async def test_config_edit_reaches_every_worker(workers: Workers) -> None:
    (workers.config_dir / "basic.yaml").write_text(RULES.replace("50", "3"))
    await workers.service.wait_for_line("Successfully loaded new configuration")
    async with asyncio.timeout(10):
        while True:  # the primary sends the new config over each link at once; allow a moment
            answers = await workers.ask(channels=16, requests=16)
            if all(a.statuses[0].current_limit.requests_per_unit == 3 for a in answers):
                break
            await asyncio.sleep(0.1)
    assert all(held > 0 for held in workers.last_owners.values()), workers.last_owners


async def test_a_worker_that_dies_is_replaced(workers: Workers) -> None:
    worker = workers.pids[1]
    os.kill(worker, signal.SIGKILL)
    line = await workers.service.wait_for_line("is serving")
    assert f"pid {worker}" not in line
    new_pid = int(re.search(r"pid (\d+)", line)[1])  # type: ignore[index]
    workers.pids[1] = new_pid
    async with asyncio.timeout(10):
        while True:
            await workers.ask(channels=16, requests=16)
            if all(held > 0 for held in workers.last_owners.values()):
                break
            await asyncio.sleep(0.1)
    assert any(f"pid {worker}) exited with -9" in line for line in workers.service.lines)


@pytest.mark.parametrize("group", [False, True], ids=["to-the-primary", "to-the-process-group"])
async def test_sigterm_drains_every_process_and_exits_0(workers: Workers, group: bool) -> None:
    await workers.ask(channels=4, requests=8)
    if group:  # as `timeout`, or a shell's job control: every process gets it at once
        os.killpg(workers.service.process.pid, signal.SIGTERM)
    else:  # as Kubernetes or Docker (to PID 1)
        workers.service.process.send_signal(signal.SIGTERM)
    assert await workers.service.wait() == 0
    assert not any(" ERROR " in line for line in workers.service.lines), "".join(workers.service.lines)
    for pid in workers.pids:
        assert _gone(pid), f"pid {pid} still running"
    assert not any("Traceback" in line for line in workers.service.lines), "".join(workers.service.lines)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")  # exited, not yet reaped
    except FileNotFoundError:
        return True


async def test_only_the_primary_follows_xds_and_every_worker_gets_its_configs(
    tmp_path: Path, redis_db: RedisServer, transport: str
) -> None:
    ads = AdsServer()
    await ads.start()
    try:
        await ads.set_snapshot("v1", [rate_limit_config("w", "w", rule("k", per_unit=50))])
        env = redis_env(
            redis_db, CONFIG_TYPE="GRPC_XDS_SOTW", CONFIG_GRPC_XDS_SERVER_URL=f"127.0.0.1:{ads.port}",
            GRPC_SERVER=transport,
        )
        async with start_workers(env, tmp_path) as workers:
            answers = await workers.ask(channels=16, requests=16)
            assert {a.statuses[0].current_limit.requests_per_unit for a in answers} == {50}
            await ads.set_snapshot("v2", [rate_limit_config("w", "w", rule("k", per_unit=7))])
            async with asyncio.timeout(10):
                while True:  # the primary ACKs, then sends it over each link
                    answers = await workers.ask(channels=16, requests=16)
                    if {a.statuses[0].current_limit.requests_per_unit for a in answers} == {7}:
                        break
                    await asyncio.sleep(0.1)
            assert all(held > 0 for held in workers.last_owners.values()), workers.last_owners
            assert ads.open_streams == 1  # one subscription for the whole service
    finally:
        await ads.stop()


def test_the_primary_keeps_stats_max_keys(tmp_path: Path) -> None:
    # The primary's stats sum the workers'; they are bounded by STATS_MAX_KEYS like any App's
    # (the primary once built its aggregate with the default bound instead).
    settings = Settings.from_env(base_env(STATS_MAX_KEYS="7"))
    pool = WorkerPool(settings, {}, 1, target=worker_main, stop_grace=1.0)  # nothing started
    app = primary_app(settings, pool)
    assert isinstance(app.stats, AggregateStats)
    assert app.stats.max_keys == 7
    for i in range(20):
        app.stats.add(f"ratelimit.service.rate_limit.d.k_{i}.total_hits")
    assert len(app.stats) == 7
