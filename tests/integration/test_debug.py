"""The debug port (docs/operations.md (Debug port)): index, /rlconfig, /stats, redacted /settings and the profiler answers."""

from __future__ import annotations

import json
import logging
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from support.service_env import base_env, config_dir_env

from ratelimit_svc.app import App
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.settings.model import Settings

RULES = """
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: key2
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 10}
    descriptors:
      - key: sub
        rate_limit: {unit: day, requests_per_unit: 7}
"""


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    runtime, _ = config_dir_env(tmp_path, RULES)
    env = base_env(**runtime, REDIS_AUTH="user:s3cret-password", DEBUG_PROFILING_ENABLED="true")
    async with App(Settings.from_env(env)) as running:
        yield running


@pytest.fixture
async def debug(app: App) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.debug is not None
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.debug.port}") as session:
        yield session


async def get(debug: aiohttp.ClientSession, path: str) -> str:
    async with debug.get(path) as response:
        assert response.status == 200, await response.text()
        return await response.text()


async def test_index_lists_every_endpoint(debug: aiohttp.ClientSession) -> None:
    lines = (await get(debug, "/")).splitlines()
    paths = [line.split(": ", 1)[0] for line in lines]
    assert paths == sorted(paths)
    for path in ("/rlconfig", "/stats", "/settings", "/debug/tasks", "/debug/threads", "/debug/tracemalloc"):
        assert path in paths
        async with debug.get(path) as response:
            assert response.status == 200
    assert "/rlconfig: print out the currently loaded configuration for debugging" in lines


async def test_rlconfig_is_the_reference_line_format(debug: aiohttp.ClientSession) -> None:
    assert await get(debug, "/rlconfig") == (
        "basic.key1: unit=MINUTE requests_per_unit=2, shadow_mode: false, quota_mode: false\n"
        "basic.key2: unit=HOUR requests_per_unit=10, shadow_mode: true, quota_mode: false\n"
        "basic.key2.sub: unit=DAY requests_per_unit=7, shadow_mode: false, quota_mode: false\n"
    )


async def test_stats_are_sorted_name_value_lines(app: App, debug: aiohttp.ClientSession) -> None:
    request = Request("basic", (RequestDescriptor((("key1", "x"),)),))
    for _ in range(3):
        await app.service.should_rate_limit(request)
    lines = (await get(debug, "/stats")).splitlines()
    assert lines == sorted(lines)
    stats = dict(line.split(": ") for line in lines)
    assert stats["ratelimit.service.config_load_success"] == "1"
    assert stats["ratelimit.service.rate_limit.basic.key1.total_hits"] == "3"
    assert stats["ratelimit.service.rate_limit.basic.key1.over_limit"] == "1"


async def test_settings_are_shown_without_credentials(debug: aiohttp.ClientSession) -> None:
    text = await get(debug, "/settings")
    assert "s3cret" not in text
    settings = json.loads(text)
    assert settings["redis"]["auth"] == "<redacted>"
    assert settings["backend_type"] == "memory"


async def test_tasks_dump_shows_the_service_tasks_with_stacks(debug: aiohttp.ClientSession) -> None:
    text = await get(debug, "/debug/tasks")
    assert text.splitlines()[0].endswith("asyncio tasks")
    for name in ("health-publish", "health-backend-ping", "config-reload"):
        assert f"--- {name}:" in text
    ping = text.split("--- health-backend-ping:", 1)[1].split("\n---", 1)[0]
    assert "in monitor_backend" in ping and "in sleep" in ping  # the await chain, innermost last


async def test_threads_dump_shows_each_thread_stack(debug: aiohttp.ClientSession) -> None:
    text = await get(debug, "/debug/threads")
    assert "--- MainThread" in text
    assert "dump_threads" in text  # the main thread is answering this very request


async def test_tracemalloc_starts_on_demand_and_lists_top_sites(debug: aiohttp.ClientSession) -> None:
    assert not tracemalloc.is_tracing()
    try:
        assert "not tracing" in await get(debug, "/debug/tracemalloc")
        assert "tracemalloc started (5 frames per trace)" in await get(debug, "/debug/tracemalloc?start=1&frames=5")
        assert tracemalloc.is_tracing()
        keep = [bytearray(1000) for _ in range(100)]  # something recent to show
        top = await get(debug, "/debug/tracemalloc?limit=3")
        lines = top.splitlines()
        assert lines[0].startswith("traced memory: current ")
        assert lines[1] == "top 3 by lineno:"
        assert 1 <= len(lines) - 2 <= 3
        assert all("size=" in line and "count=" in line for line in lines[2:])
        by_file = await get(debug, "/debug/tracemalloc?key=filename&limit=50")
        assert "test_debug.py" in by_file
        del keep
        async with debug.get("/debug/tracemalloc?key=nonsense") as response:
            assert response.status == 400
        assert await get(debug, "/debug/tracemalloc?stop=1") == "tracemalloc stopped\n"
        assert not tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "query",
    [
        "start=1&frames=70000", "start=1&frames=65535", "start=1&frames=101", "start=1&frames=0",
        "start=1&frames=-1", "start=1&frames=%C2%B2", "start=1&frames=1e3", "start=1&frames=" + "9" * 40,
    ],
)
async def test_tracemalloc_parameters_out_of_range_are_400(debug: aiohttp.ClientSession, query: str) -> None:
    try:
        async with debug.get(f"/debug/tracemalloc?{query}") as response:
            assert response.status == 400, await response.text()
            assert "frames must be an integer from 1 to 100" in await response.text()
        assert not tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()


async def test_tracemalloc_limit_is_bounded(debug: aiohttp.ClientSession) -> None:
    try:
        await get(debug, "/debug/tracemalloc?start=1&frames=100")
        for limit in ("0", "1001", "\u0661"):
            async with debug.get("/debug/tracemalloc", params={"limit": limit}) as response:
                assert response.status == 400, await response.text()
        assert "top 1000 by lineno:" in await get(debug, "/debug/tracemalloc?limit=1000")
    finally:
        tracemalloc.stop()


async def test_profiling_endpoints_are_off_by_default(tmp_path: Path) -> None:
    runtime, _ = config_dir_env(tmp_path, RULES)
    async with App(Settings.from_env(base_env(**runtime))) as app:
        assert app.debug is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.debug.port}") as debug:
            for path in ("/debug/tasks", "/debug/threads", "/debug/tracemalloc?start=1&frames=65535"):
                async with debug.get(path) as response:
                    assert response.status == 403
                    assert "set DEBUG_PROFILING_ENABLED=true" in await response.text()
            assert not tracemalloc.is_tracing()
            index = await get(debug, "/")
            assert "/debug/tracemalloc: off (DEBUG_PROFILING_ENABLED=false)" in index.splitlines()
            assert "basic.key1" in await get(debug, "/rlconfig")


async def test_logs_the_listening_address(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime, _ = config_dir_env(tmp_path)
    with caplog.at_level(logging.WARNING):
        async with App(Settings.from_env(base_env(**runtime))) as app:
            assert app.debug is not None
            address = f"127.0.0.1:{app.debug.port}"
    assert f"Listening for debug on '{address}'" in caplog.messages
