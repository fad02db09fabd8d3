"""Health (docs/operations.md (Health)): one state behind both the gRPC health service ("" and "ratelimit") and HTTP
/healthcheck, following backend reachability, shutdown and HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED.

gRPC health is read with Watch streams, so each change is waited for as an event; /healthcheck is
asked right after, and must already agree (the HTTP side reads the state directly).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.redis_fixtures import RedisServer
from support.service_env import base_env, config_dir_env, rules

from ratelimit_svc.app import App
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.servers.health import Health
from ratelimit_svc.settings.model import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHANGE_TIMEOUT = 20.0  # a PING a second, REDIS_OP_TIMEOUT, the breaker's cool-down: seconds, not 20


@dataclass
class Probes:
    """Both health surfaces of one running App."""

    app: App
    watches: list[grpc.aio.UnaryStreamCall]
    http: aiohttp.ClientSession
    health: health_pb2_grpc.HealthStub

    async def next_grpc(self) -> list[int]:
        """The next status each Watch stream reports (the first call gives the current one)."""
        async with asyncio.timeout(CHANGE_TIMEOUT):
            return [(await watch.read()).status for watch in self.watches]

    async def check_grpc(self) -> list[int]:
        return [
            (await self.health.Check(health_pb2.HealthCheckRequest(service=name))).status
            for name in ("", "ratelimit")
        ]

    async def http_status(self) -> tuple[int, str]:
        async with self.http.get("/healthcheck") as response:
            return response.status, await response.text()


@asynccontextmanager
async def probes(app: App) -> AsyncIterator[Probes]:
    assert app.grpc is not None and app.http is not None
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel,
        aiohttp.ClientSession(f"http://127.0.0.1:{app.http.port}") as http,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in ("", "ratelimit")]
        try:
            yield Probes(app, watches, http, stub)
        finally:
            for watch in watches:
                watch.cancel()


# -- the state itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("require_config", "backend", "config", "shutting_down", "healthy"),
    [
        (False, True, False, False, True),
        (False, False, True, False, False),
        (False, True, True, True, False),
        (True, True, False, False, False),
        (True, True, True, False, True),
        (True, False, True, False, False),
        (True, True, True, True, False),
    ],
)
def test_healthy_combines_every_rule(
    require_config: bool, backend: bool, config: bool, shutting_down: bool, healthy: bool
) -> None:
    health = Health(require_config=require_config)
    health.set_backend_reachable(backend)
    health.set_config_loaded(config)
    if shutting_down:
        health.start_shutdown()
    assert health.healthy is healthy


async def test_observers_hear_each_change_once() -> None:
    health = Health()
    heard: list[bool] = []

    async def observer(healthy: bool) -> None:
        heard.append(healthy)

    health.observe(observer)
    await health.publish()
    health.set_backend_reachable(True)  # no change
    await health.publish()
    health.set_backend_reachable(False)
    await health.publish()
    health.set_backend_reachable(True)
    await health.publish()
    assert heard == [True, False, True]


# -- through a running service ------------------------------------------------------------------


def redis_env(tmp_path: Path, redis: RedisServer) -> dict[str, str]:
    runtime, _ = config_dir_env(tmp_path)
    return base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis.url,
        REDIS_OP_TIMEOUT="300ms",
    )  # fmt: skip


@pytest.mark.parametrize("failure", ["killed", "hung"])
async def test_backend_down_is_unhealthy_and_back_is_healthy(
    tmp_path: Path, redis_db: RedisServer, failure: str
) -> None:
    async with App(Settings.from_env(redis_env(tmp_path, redis_db))) as app, probes(app) as p:
        assert await p.next_grpc() == [SERVING, SERVING]
        assert await p.http_status() == (200, "OK")

        if failure == "killed":
            redis_db.kill()
        else:
            redis_db.stop()  # SIGSTOP: connections stay open, nothing answers
        assert await p.next_grpc() == [NOT_SERVING, NOT_SERVING]
        assert (await p.http_status())[0] == 500
        assert await p.check_grpc() == [NOT_SERVING, NOT_SERVING]

        if failure == "killed":
            redis_db.restart()
        else:
            redis_db.cont()
        assert await p.next_grpc() == [SERVING, SERVING]
        assert await p.http_status() == (200, "OK")
        assert await p.check_grpc() == [SERVING, SERVING]


@pytest.mark.parametrize("required", [True, False])
async def test_healthy_with_at_least_one_config_loaded(tmp_path: Path, required: bool) -> None:
    runtime, config_dir = config_dir_env(tmp_path, text=None)  # an empty config directory
    env = base_env(
        **runtime, RUNTIME_WATCH_ROOT="false",
        HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED=str(required).lower(),
    )  # fmt: skip
    async with App(Settings.from_env(env)) as app, probes(app) as p:
        assert app.config is not None and not app.config.domains
        if not required:
            assert await p.next_grpc() == [SERVING, SERVING]
            assert await p.http_status() == (200, "OK")
            return
        assert await p.next_grpc() == [NOT_SERVING, NOT_SERVING]
        assert (await p.http_status())[0] == 500

        await asyncio.to_thread((config_dir / "a.yaml").write_text, rules("alpha"))
        assert await p.next_grpc() == [SERVING, SERVING]
        assert await p.http_status() == (200, "OK")

        await asyncio.to_thread((config_dir / "a.yaml").unlink)
        assert await p.next_grpc() == [NOT_SERVING, NOT_SERVING]
        assert (await p.http_status())[0] == 500


async def test_shutdown_is_unhealthy_at_once_while_still_answering(tmp_path: Path) -> None:
    runtime, _ = config_dir_env(tmp_path)
    async with App(Settings.from_env(base_env(**runtime))) as app, probes(app) as p:
        assert await p.next_grpc() == [SERVING, SERVING]
        app.stop()  # what the SIGTERM handler calls
        assert not app.health.healthy
        assert (await p.http_status())[0] == 500
        assert await p.next_grpc() == [NOT_SERVING, NOT_SERVING]
        # Requests are still answered until the listeners close.
        decision = await app.service.should_rate_limit(Request("basic", (RequestDescriptor((("key1", "a"),)),)))
        assert decision.overall is Code.OK
