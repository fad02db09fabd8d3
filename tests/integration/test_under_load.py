"""Reload and shutdown under load (docs/reliability.md): config swapped repeatedly → 0 failed requests; a bad
file → the old config keeps serving; SIGTERM → 0 failed in-flight calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from support.fault_proxy import DelayProxy
from support.redis_fixtures import HOST, RedisServer

from ratelimit_svc.app import App
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.stats.statsd import StatsdSink

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 8


def rules(limit: int) -> str:
    return f"domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: hour, requests_per_unit: {limit}}}\n"


def request() -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor()
    d.entries.add(key="k", value="v")
    return rls_pb2.RateLimitRequest(domain="d", descriptors=[d])


class Runtime:
    """RUNTIME_ROOT as the symlink ``current`` → ``vN``, swapped atomically like
    ``ln -s vN tmp && mv -T tmp current``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "current"
        self.version = 0

    def publish(self, files: dict[str, str]) -> None:
        self.version += 1
        target = self.base / f"v{self.version}"
        (target / "rl" / "config").mkdir(parents=True)
        for name, text in files.items():
            (target / "rl" / "config" / name).write_text(text)
        temporary = self.base / "tmp-link"
        os.symlink(target, temporary)
        os.replace(temporary, self.root)


@dataclass
class Load:
    """WORKERS clients asking in a loop; each one's answers (limits) in order, every failure."""

    stub: rls_pb2_grpc.RateLimitServiceStub
    answers: list[list[int]] = field(default_factory=lambda: [[] for _ in range(WORKERS)])
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def limits(self) -> list[int]:
        return [limit for answers in self.answers for limit in answers]

    async def _worker(self, answers: list[int]) -> None:
        while not self._stop.is_set():
            try:
                response = await self.stub.ShouldRateLimit(request(), timeout=10)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
                continue
            answers.append(response.statuses[0].current_limit.requests_per_unit)
            await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        spawn = asyncio.get_running_loop().create_task
        workers = [spawn(self._worker(answers)) for answers in self.answers]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*workers)

    async def next_limit(self) -> int:
        """The limit in the answer to a request sent now."""
        response = await self.stub.ShouldRateLimit(request(), timeout=10)
        return response.statuses[0].current_limit.requests_per_unit


@contextlib.asynccontextmanager
async def service(tmp_path: Path) -> AsyncIterator[tuple[App, Runtime, Load]]:
    runtime = Runtime(tmp_path)
    runtime.publish({"d.yaml": rules(1000)})
    env = {
        "BACKEND_TYPE": "memory", "GRPC_HOST": HOST, "GRPC_PORT": "0", "HOST": HOST,
        "PORT": "0", "DEBUG_HOST": HOST, "DEBUG_PORT": "0", "USE_STATSD": "false",
        "RUNTIME_ROOT": str(runtime.root), "RUNTIME_SUBDIRECTORY": "rl",
        "RUNTIME_WATCH_ROOT": "true",
    }  # fmt: skip
    async with App(Settings.from_env(env)) as app:
        assert app.grpc is not None and app.source.watcher is not None
        async with grpc.aio.insecure_channel(f"{HOST}:{app.grpc.port}") as channel:
            yield app, runtime, Load(rls_pb2_grpc.RateLimitServiceStub(channel))


async def swapped(app: App, runtime: Runtime, files: dict[str, str]) -> None:
    """Publish a version and wait until the watcher has loaded it."""
    assert app.source.watcher is not None
    loads = app.source.watcher.loads
    runtime.publish(files)
    async with asyncio.timeout(10):
        await app.source.watcher.wait_for_loads(loads + 1)


async def test_config_swapped_repeatedly_under_load_fails_no_request(tmp_path: Path) -> None:
    async with service(tmp_path) as (app, runtime, load), load.running():
        assert await load.next_limit() == 1000
        for version in range(1, 11):
            await swapped(app, runtime, {"d.yaml": rules(1000 + version)})
            assert await load.next_limit() == 1000 + version
        answered = len(load.limits)
    assert load.failures == []
    assert answered > 100
    # Limits only ever move forward: no client saw an older config after a newer one.
    assert all(answers == sorted(answers) for answers in load.answers)
    assert app.stats.get("ratelimit.service.config_load_success") >= 11
    assert app.stats.get("ratelimit.service.config_load_error") == 0


async def test_bad_file_under_load_keeps_the_old_config_serving(tmp_path: Path) -> None:
    async with service(tmp_path) as (app, runtime, load), load.running():
        assert await load.next_limit() == 1000
        broken = {"d.yaml": rules(2000), "zz-broken.yaml": "domain: e\ndescriptors: [key: ]\n  -"}
        await swapped(app, runtime, broken)
        assert app.stats.get("ratelimit.service.config_load_error") == 1
        for _ in range(20):
            assert await load.next_limit() == 1000  # the whole load was refused, not half of it
        await swapped(app, runtime, {"d.yaml": rules(3000)})
        assert await load.next_limit() == 3000
    assert load.failures == []
    assert set(load.limits) == {1000, 3000}


# -- SIGTERM to the process under load ------------------------------------------------------------

DRAIN = 0.5
BACKEND_DELAY = 0.1  # every Redis exchange takes this long, so calls are really in flight


@dataclass
class Call:
    started: float
    seconds: float
    code: grpc.StatusCode


async def test_sigterm_under_load_fails_no_in_flight_call(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    redis: RedisServer = redis_server_factory()
    proxy = DelayProxy(redis.port)
    await proxy.start()
    proxy.delay = BACKEND_DELAY
    config_dir = tmp_path / "rl" / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "d.yaml").write_text(rules(10**9))
    env = {
        **os.environ,
        "BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": f"{HOST}:{proxy.port}",
        "REDIS_POOL_SIZE": "64", "REDIS_OP_TIMEOUT": "3s", "SHUTDOWN_DRAIN_SECONDS": str(DRAIN),
        "GRPC_HOST": HOST, "GRPC_PORT": "0", "HOST": HOST, "PORT": "0", "DEBUG_HOST": HOST,
        "DEBUG_PORT": "0", "USE_STATSD": "false", "RUNTIME_ROOT": str(tmp_path),
        "RUNTIME_SUBDIRECTORY": "rl", "RUNTIME_WATCH_ROOT": "false",
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ratelimit_svc", env=env, cwd=ROOT,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    calls: list[Call] = []
    warmed_up = asyncio.Event()
    try:
        assert process.stderr is not None
        port = 0
        async with asyncio.timeout(30):
            while not port:
                line = (await process.stderr.readline()).decode()
                assert line, "the service exited before listening"
                found = re.search(r"Listening for gRPC on '127\.0\.0\.1:(\d+)'", line)
                port = int(found.group(1)) if found else 0
        drained = asyncio.get_running_loop().create_task(process.stderr.read())

        async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)

            async def worker() -> None:
                while True:
                    started = time.monotonic()
                    try:
                        await stub.ShouldRateLimit(request(), timeout=10)
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code()
                    calls.append(Call(started, time.monotonic() - started, code))
                    if len(calls) >= 64:
                        warmed_up.set()
                    if code is not grpc.StatusCode.OK:
                        return

            workers = [asyncio.get_running_loop().create_task(worker()) for _ in range(32)]
            async with asyncio.timeout(30):  # every client connected and calling, however loaded
                await warmed_up.wait()
            sigterm_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await asyncio.gather(*workers)
                assert await process.wait() == 0
        log = (await drained).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await proxy.close()

    in_flight = [c for c in calls if c.started < sigterm_at < c.started + c.seconds]
    assert len(in_flight) >= 16, "the test must catch calls in flight"
    before_close = [c for c in calls if c.started < sigterm_at + DRAIN - 0.1]
    assert all(c.code is grpc.StatusCode.OK for c in before_close), [
        c for c in before_close if c.code is not grpc.StatusCode.OK
    ]
    assert any(c.started > sigterm_at for c in before_close), "calls are served while draining"
    # After the drain the listener refuses new calls: UNAVAILABLE, or CANCELLED for one that reached
    # the server as it closed, before any handler took it. Neither ever reached the backend: Redis
    # counted exactly the calls that were answered OK.
    for call in calls:
        if call.code is not grpc.StatusCode.OK:
            assert call.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), call
    with redis.client() as admin:
        counted = sum(int(admin.get(key) or 0) for key in admin.keys("d_k_v_*"))
    assert counted == sum(c.code is grpc.StatusCode.OK for c in calls)
    assert "Traceback" not in log


async def test_statsd_sink_closes_while_busy() -> None:
    """The soak found SIGTERM never finishing under load with statsd on: the sink's send loop,
    cancelled while its wake-up event was being set, swallowed the cancellation (asyncio.wait_for
    on Python 3.11) and the final flush waited for it forever. Close it mid-burst, many times."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unread:
        unread.bind((HOST, 0))
        for attempt in range(100):
            sink = StatsdSink(HOST, unread.getsockname()[1], protocol="udp")
            await sink.start()
            sender = sink._task
            stop_kicking = asyncio.Event()

            async def kick(sink: StatsdSink = sink, stop: asyncio.Event = stop_kicking) -> None:
                while not stop.is_set():
                    sink.flush_counter("ratelimit.soak." + "x" * 1500, 1)  # a packet's worth
                    await asyncio.sleep(0)

            kicker = asyncio.get_running_loop().create_task(kick())
            for _ in range(attempt % 5):
                await asyncio.sleep(0)
            try:
                async with asyncio.timeout(2):
                    await sink.close()
            finally:
                stop_kicking.set()
                await kicker
            assert sender is not None and sender.done(), f"attempt {attempt}: still sending"
