"""CONFIG_TYPE=GRPC_XDS_SOTW wired into the App: startup waits for the first snapshot, and the
running service's answers change when the control plane pushes a new one."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from support.clock import FakeClock
from support.load_builders import fork_server_pid
from support.service_env import base_env
from support.xds_server import WAIT_SECONDS, AdsServer, rate_limit_config, rule

from ratelimit_svc.app import App
from ratelimit_svc.config import xds
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
REQUEST = rls_pb2.RateLimitRequest(
    domain="edge",
    descriptors=[
        ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="path", value="/api")]
        )
    ],
)


def settings(port: int, **extra: str) -> Settings:
    return Settings.from_env(
        base_env(
            CONFIG_TYPE="GRPC_XDS_SOTW",
            CONFIG_GRPC_XDS_SERVER_URL=f"127.0.0.1:{port}",
            XDS_CLIENT_BACKOFF_INITIAL_INTERVAL="100ms",
            XDS_CLIENT_BACKOFF_MAX_INTERVAL="200ms",
            **extra,
        )
    )


@pytest.fixture
async def ads() -> AsyncIterator[AdsServer]:
    server = AdsServer()
    await server.start()
    yield server
    await server.stop()


async def test_startup_waits_for_the_first_snapshot_then_follows_pushes(
    ads: AdsServer, clock: FakeClock
) -> None:
    entered = asyncio.Event()
    app = App(settings(ads.port), clock=clock)

    async def run() -> None:
        async with app:
            entered.set()
            await app.run()

    task = asyncio.create_task(run())
    try:
        await asyncio.sleep(0.3)
        assert not entered.is_set()  # no snapshot yet: still starting, not serving
        await ads.set_snapshot("v1", [rate_limit_config("edge", "edge", rule("path", "/api", per_unit=2))])
        async with asyncio.timeout(WAIT_SECONDS):
            await entered.wait()
        assert app.grpc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            codes = [(await stub.ShouldRateLimit(REQUEST)).overall_code for _ in range(3)]
            assert codes == [OK, OK, OVER]

            await ads.set_snapshot("v2", [rate_limit_config("edge", "edge", rule("path", "/api", per_unit=5))])
            async with asyncio.timeout(WAIT_SECONDS):
                while True:
                    response = await stub.ShouldRateLimit(REQUEST)
                    if response.statuses[0].current_limit.requests_per_unit == 5:
                        break
                    await asyncio.sleep(0.05)
            assert response.overall_code == OK
            assert app.stats.get("ratelimit.service.config_load_success") == 2
    finally:
        app.stop()
        await task


async def test_force_start_serves_before_any_config(ads: AdsServer) -> None:
    app = App(settings(ads.port, FORCE_START_WITHOUT_INITIAL_CONFIG="true"))
    async with app:
        assert app.grpc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ShouldRateLimit(REQUEST)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "no rate limit configuration loaded"


async def test_console_shows_the_xds_version_nonce_and_a_rejected_snapshot(ads: AdsServer) -> None:
    """docs/console.md (Rules): the source of an xDS config and the last rejected push."""
    await ads.set_snapshot("v1", [rate_limit_config("edge", "edge", rule("path", "/api", per_unit=2))])
    async with App(settings(ads.port)) as app:
        assert app.console is not None
        rules = app.console.rules()
        assert rules["source"]["type"] == "xds" and rules["source"]["version"] == "v1"
        assert rules["source"]["nonce"] and rules["loads"] == 1
        bad = rate_limit_config("edge", "edge", rule("path", "/api", per_unit=2))
        await ads.set_snapshot("v2", [bad, bad])  # the same domain twice: rejected
        async with asyncio.timeout(WAIT_SECONDS):
            while True:  # the push arrives on the client's own stream: no event of ours
                if app.config_status.failures:
                    break
                await asyncio.sleep(0.05)
        rules = app.console.rules()
    assert rules["source"]["version"] == "v1" and rules["failures"] == 1
    assert "edge" in rules["last_error"]["message"]
    assert [d["domain"] for d in rules["domains"]] == ["edge"]


async def test_a_call_is_answered_while_a_large_update_is_built(
    ads: AdsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/reliability.md: an update over OFFLOOP_BYTES is built in the config load process, not
    on the serving loop. The fork server is held stopped, so the build cannot finish; a call is
    answered meanwhile, by the last config, and the new one follows once the build can run."""

    def big(per_unit: int) -> Any:
        clients = [rule("client", f"c{i}") for i in range(4000)]
        return rate_limit_config("edge", "edge", rule("path", "/api", per_unit=per_unit), *clients)

    assert big(1).ByteSize() > xds.OFFLOOP_BYTES
    await ads.set_snapshot("v1", [big(2)])
    async with App(settings(ads.port)) as app:  # v1 was built by a load process: a fork server runs
        building = asyncio.Event()
        build_in_child = xds.build_in_child

        async def watched(*args: Any, **kwargs: Any) -> Any:
            building.set()
            return await build_in_child(*args, **kwargs)

        monkeypatch.setattr(xds, "build_in_child", watched)
        assert app.grpc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            server = fork_server_pid()
            os.kill(server, signal.SIGSTOP)
            try:
                await ads.set_snapshot("v2", [big(5)])
                async with asyncio.timeout(WAIT_SECONDS):
                    await building.wait()
                response = await stub.ShouldRateLimit(REQUEST, timeout=WAIT_SECONDS)
                assert response.statuses[0].current_limit.requests_per_unit == 2
                assert isinstance(app.source, xds.XdsConfigClient) and app.source.version == "v1"
            finally:
                os.kill(server, signal.SIGCONT)
            await ads.wait_request(lambda seen: seen.is_ack and seen.request.version_info == "v2")
            response = await stub.ShouldRateLimit(REQUEST)
            assert response.statuses[0].current_limit.requests_per_unit == 5
