"""``/debug/peek`` (docs/observability.md (Peeking at a counter)): a descriptor's counters — the
backend key, hits so far, limit, remaining, reset — read without counting, on a real Redis and on
the memory backend, as JSON and as escaped text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.clock import FakeClock
from support.redis_fixtures import RedisServer
from support.service_env import base_env, config_dir_env

from ratelimit_svc.app import App
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.settings.model import Settings

RULES = """
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: free
    rate_limit: {unlimited: true}
"""


@pytest.fixture(params=["memory", "redis"])
async def app(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[App]:
    runtime, _ = config_dir_env(tmp_path, RULES)
    extra: dict[str, str] = {}
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_db")
        extra = {"BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": redis.url, "WORKERS": "1"}
    async with App(Settings.from_env(base_env(**runtime, **extra)), clock=clock) as running:
        yield running


async def hit(app: App, value: str) -> None:
    await app.service.should_rate_limit(Request("basic", (RequestDescriptor((("key1", value),)),)))


async def peek(app: App, query: str, **headers: str) -> tuple[int, str, Any]:
    assert app.debug is not None
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{app.debug.port}/debug/peek?{query}"
        async with session.get(url, headers=headers) as response:
            text = await response.text()
            is_json = response.content_type == "application/json"
            return response.status, text, (await response.json()) if is_json else None


async def test_peek_shows_the_counter_and_counts_nothing(app: App, clock: FakeClock) -> None:
    await hit(app, "a")
    for _ in range(3):
        status, _, body = await peek(app, "domain=basic&descriptor=key1=a&format=json")
        assert status == 200
        (view,) = body["descriptors"]
        window_start = int(clock.now) - int(clock.now) % 60
        assert view["key"] == f"basic_key1_a_{window_start}"
        assert (view["value"], view["remaining"], view["over_limit"]) == (1, 1, False)
        assert view["rule"]["requests_per_unit"] == 2 and view["rule"]["unit"] == "MINUTE"
        assert view["reset_seconds"] == 60 - int(clock.now) % 60
    await hit(app, "a")
    await hit(app, "a")  # over
    _, _, body = await peek(app, "domain=basic&descriptor=key1=a", Accept="application/json")
    assert (body["descriptors"][0]["value"], body["descriptors"][0]["over_limit"]) == (3, True)
    clock.advance(60)  # a new window
    _, _, body = await peek(app, "domain=basic&descriptor=key1=a&format=json")
    assert body["descriptors"][0]["value"] == 0


async def test_peek_text_lists_every_descriptor(app: App) -> None:
    await hit(app, "a")
    status, text, _ = await peek(app, "domain=basic&descriptor=key1=a&descriptor=free=x&descriptor=other=y")
    assert status == 200
    lines = text.splitlines()
    assert lines[0] == "domain: basic"
    assert lines[1].startswith("key1=a: 1/2 per minute, 1 remaining, resets in ")
    assert lines[2].startswith("    key: basic_key1_a_")
    assert lines[3:] == ["free=x: unlimited", "other=y: no rule matches (not limited)"]


async def test_peek_escapes_request_values(app: App) -> None:
    status, text, _ = await peek(app, "domain=basic&descriptor=key1=a%0Aforged: line%3Cb%3E")
    assert status == 200
    first = text.splitlines()[1]
    assert first.startswith("key1=a\\nforged: line<b>: 0/2 per minute")
    assert "\nforged" not in text


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("", "give ?domain=D"),
        ("domain=basic", "give ?domain=D"),
        ("domain=basic&descriptor=novalue", "'novalue' is not key=value"),
        ("domain=basic&" + "&".join(["descriptor=k=v"] * 17), "at most 16"),
    ],
)
async def test_peek_rejects_bad_parameters_saying_why(app: App, query: str, complaint: str) -> None:
    status, text, _ = await peek(app, query)
    assert status == 400 and complaint in text
    status, _, body = await peek(app, query + "&format=json")
    assert status == 400 and complaint in body["message"]


async def test_peek_is_listed_on_the_index(app: App) -> None:
    assert app.debug is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{app.debug.port}/") as response:
            assert "/debug/peek: current value, limit and reset" in await response.text()
