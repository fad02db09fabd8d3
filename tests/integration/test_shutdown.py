"""Graceful shutdown (docs/operations.md (Shutdown and drain)): a real service process under continuous gRPC load gets SIGTERM.

Clients behave as an Envoy fleet behind health checks does: they send back-to-back requests and
stop when the service's health turns NOT_SERVING; one "slow" client keeps sending for another half
second, like a load balancer that has not noticed yet. With SHUTDOWN_DRAIN_SECONDS=1 every call
any of them made must be answered OK, and the process must exit 0 — after the drain, not before.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.service_env import ServiceProcess, base_env, config_dir_env

from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

RULES = """
domain: load
descriptors:
  - key: client
    rate_limit: {unit: hour, requests_per_unit: 100000000}
"""
CLIENTS = 6
CALLS_BEFORE_SIGTERM = 300
SLOW_CLIENT_EXTRA_SECONDS = 0.5
DRAIN_SECONDS = 3  # long enough to probe /healthcheck mid-drain on a loaded 2-core machine


@dataclass
class Load:
    target: str
    not_serving: asyncio.Event = field(default_factory=asyncio.Event)
    warmed_up: asyncio.Event = field(default_factory=asyncio.Event)
    not_serving_at: float = 0.0
    calls: int = 0
    calls_after_not_serving: int = 0
    failures: list[str] = field(default_factory=list)

    async def client(self, number: int, *, slow: bool = False) -> None:
        request = rls_pb2.RateLimitRequest(
            domain="load",
            descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "client", "value": str(number)}])],
        )
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            while True:
                if self.not_serving.is_set():
                    late = time.monotonic() - self.not_serving_at
                    if not slow or late > SLOW_CLIENT_EXTRA_SECONDS:
                        return
                    self.calls_after_not_serving += 1
                try:
                    response = await stub.ShouldRateLimit(request, timeout=5)
                except grpc.aio.AioRpcError as exc:
                    self.failures.append(f"client {number}: {exc.code().name} {exc.details()}")
                    return
                if response.overall_code != rls_pb2.RateLimitResponse.OK:
                    self.failures.append(f"client {number}: {response}")
                self.calls += 1
                if self.calls >= CALLS_BEFORE_SIGTERM:
                    self.warmed_up.set()

    async def watch_health(self) -> list[int]:
        seen: list[int] = []
        async with grpc.aio.insecure_channel(self.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="ratelimit")
            )
            async for answer in watch:
                seen.append(answer.status)
                if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    self.not_serving_at = time.monotonic()
                    self.not_serving.set()
                    watch.cancel()
                    break
        return seen


@pytest.mark.parametrize("transport", ["pyvoy", "grpcio"])
async def test_sigterm_under_load_fails_no_call(tmp_path: Path, transport: str) -> None:
    runtime, _ = config_dir_env(tmp_path, RULES)
    service = await ServiceProcess.start(
        base_env(**runtime, SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS), GRPC_SERVER=transport)
    )
    try:
        load = Load(f"127.0.0.1:{service.ports['gRPC']}")
        watcher = asyncio.create_task(load.watch_health())
        clients = [asyncio.create_task(load.client(n, slow=n == 0)) for n in range(CLIENTS)]
        async with asyncio.timeout(30):
            await load.warmed_up.wait()
        sent_at = time.monotonic()
        service.process.send_signal(signal.SIGTERM)

        async with asyncio.timeout(30):
            await load.not_serving.wait()
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{service.ports['HTTP']}/healthcheck") as answer,
            ):
                assert answer.status == 500  # draining: unhealthy, yet still answering
            await asyncio.gather(*clients)
            health_seen = await watcher
        exit_code = await service.wait()
        exited_after = time.monotonic() - sent_at
    finally:
        await service.kill()

    log = "".join(service.lines)
    assert load.failures == [], log
    assert load.calls > CALLS_BEFORE_SIGTERM
    assert load.calls_after_not_serving > 0  # the slow client was served during the drain
    assert health_seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert load.not_serving_at - sent_at < DRAIN_SECONDS / 2  # unhealthy at once, not after the drain
    assert exit_code == 0, log
    assert exited_after >= DRAIN_SECONDS
    assert f"draining for {DRAIN_SECONDS}s" in log


@pytest.mark.parametrize("transport", ["pyvoy", "grpcio"])
async def test_sigterm_while_waiting_for_the_backend_exits_cleanly(tmp_path: Path, transport: str) -> None:
    """Redis is not there yet: the startup PING is being retried when the signal comes."""
    runtime, _ = config_dir_env(tmp_path)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refused
        env = base_env(
            **runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=nobody,
            REDIS_STARTUP_INITIAL_INTERVAL="50ms", REDIS_STARTUP_MAX_INTERVAL="50ms",
            GRPC_SERVER=transport, WORKERS="1",
        )  # fmt: skip
        service = await ServiceProcess.spawn(env)
        try:
            await service.wait_for_line("redis not ready (attempt 2)")
            service.process.send_signal(signal.SIGTERM)
            exit_code = await service.wait()
        finally:
            await service.kill()
    log = "".join(service.lines)
    assert exit_code == 0, log
    assert "signal received: shutting down" in log
    assert "Traceback" not in log
    assert "Listening for" not in log
