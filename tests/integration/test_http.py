"""The HTTP port (docs/operations.md (HTTP port)): /healthcheck and /json through a real aiohttp client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.clock import FakeClock
from support.redis_fixtures import RedisServer
from support.service_env import base_env, config_dir_env

from ratelimit_svc.app import App
from ratelimit_svc.settings.model import Settings


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[App]:
    runtime, _ = config_dir_env(tmp_path)
    env = base_env(**runtime, LIMIT_RESPONSE_HEADERS_ENABLED="true")
    async with App(Settings.from_env(env), clock=clock) as running:
        yield running


@pytest.fixture
async def http(app: App) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.http is not None
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.http.port}") as session:
        yield session


async def post_json(http: aiohttp.ClientSession, body: Any) -> tuple[int, str]:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    async with http.post("/json", data=data) as response:
        return response.status, await response.text()


BASIC = {"domain": "basic", "descriptors": [{"entries": [{"key": "key1", "value": "a"}]}]}


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "PUT"])
async def test_healthcheck_answers_ok_to_any_method(http: aiohttp.ClientSession, method: str) -> None:
    async with http.request(method, "/healthcheck") as response:
        assert response.status == 200
        if method != "HEAD":
            assert await response.text() == "OK"


async def test_json_ok_is_proto_json_with_camel_case_enums_and_durations(http: aiohttp.ClientSession) -> None:
    status, body = await post_json(http, BASIC)
    assert status == 200
    assert json.loads(body) == {
        "overallCode": "OK",
        "statuses": [
            {
                "code": "OK",
                "currentLimit": {"requestsPerUnit": 2, "unit": "MINUTE"},
                "limitRemaining": 1,
                "durationUntilReset": "35s",
            }
        ],
        "responseHeadersToAdd": [
            {"key": "RateLimit-Limit", "value": "2"},
            {"key": "RateLimit-Remaining", "value": "1"},
            {"key": "RateLimit-Reset", "value": "35"},
        ],
    }


async def test_json_over_limit_is_429(http: aiohttp.ClientSession) -> None:
    for _ in range(2):
        assert (await post_json(http, BASIC))[0] == 200
    status, body = await post_json(http, BASIC)
    assert status == 429
    answer = json.loads(body)
    assert answer["overallCode"] == "OVER_LIMIT"
    # limitRemaining 0 is a default value: omitted, as protojson does.
    assert answer["statuses"] == [
        {
            "code": "OVER_LIMIT",
            "currentLimit": {"requestsPerUnit": 2, "unit": "MINUTE"},
            "durationUntilReset": "35s",
        }
    ]


async def test_json_accepts_proto_field_names(http: aiohttp.ClientSession) -> None:
    body = {
        "domain": "basic",
        "descriptors": [{"entries": [{"key": "key1", "value": "b"}], "hits_addend": 2}],
    }
    status, text = await post_json(http, body)
    assert status == 200
    assert json.loads(text)["statuses"][0] == {
        "code": "OK",
        "currentLimit": {"requestsPerUnit": 2, "unit": "MINUTE"},
        "durationUntilReset": "35s",
    }  # two hits at once: none remaining (a default value, so omitted)
    status, _ = await post_json(http, body)
    assert status == 429


async def test_json_unknown_domain_is_ok_without_limit(http: aiohttp.ClientSession) -> None:
    status, body = await post_json(http, {**BASIC, "domain": "nowhere"})
    assert status == 200
    assert json.loads(body) == {"overallCode": "OK", "statuses": [{"code": "OK"}]}


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        b"\xff\xfe",
        "[1, 2]",
        {**BASIC, "colour": "blue"},
        {"domain": "basic", "descriptors": [{"entries": [{"key": "key1", "value": 5, "extra": 1}]}]},
        {"domain": 7, "descriptors": []},
        {"domain": "", "descriptors": BASIC["descriptors"]},
        {"domain": "basic"},
    ],
    ids=["not-json", "not-utf8", "not-an-object", "unknown-field", "unknown-nested-field", "wrong-type", "empty-domain", "no-descriptors"],
)
async def test_json_bad_request(http: aiohttp.ClientSession, body: Any) -> None:
    status, text = await post_json(http, body)
    assert status == 400
    error = json.loads(text)  # the reason, as JSON (docs/deployment.md (First contact))
    assert error["code"] == 400 and error["error"] == "Bad Request"
    assert error["message"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({**BASIC, "colour": "blue"}, "colour"),
        (b"\xff\xfe", "not UTF-8"),
        ({"domain": "", "descriptors": BASIC["descriptors"]}, "domain must not be empty"),
        ({"domain": "basic"}, "descriptor list must not be empty"),
        ({"domain": "basic", "descriptors": [{"entries": [{"key": "<b>", "value": 5}]}]}, "expected string"),
    ],
)
async def test_json_bad_request_says_why(http: aiohttp.ClientSession, body: Any, reason: str) -> None:
    status, text = await post_json(http, body)
    assert status == 400
    assert reason in json.loads(text)["message"]


async def test_json_without_any_config_is_503(tmp_path: Path) -> None:
    env = base_env(RUNTIME_ROOT=str(tmp_path), RUNTIME_SUBDIRECTORY="")
    async with App(Settings.from_env(env)) as app:
        assert app.http is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.http.port}") as http:
            status, text = await post_json(http, BASIC)
    assert status == 503
    assert json.loads(text) == {
        "code": 503, "error": "Service Unavailable", "message": "no rate limit configuration loaded",
    }


async def test_json_backend_down_is_503(tmp_path: Path, redis_db: RedisServer) -> None:
    runtime, _ = config_dir_env(tmp_path)
    env = base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_db.url,
        REDIS_OP_TIMEOUT="500ms",
    )  # fmt: skip
    async with App(Settings.from_env(env)) as app:
        assert app.http is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.http.port}") as http:
            assert (await post_json(http, BASIC))[0] == 200
            redis_db.kill()
            status, text = await post_json(http, BASIC)
    assert status == 503
    assert json.loads(text)["error"] == "Service Unavailable"


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (something no event announces) until true; fail after 15 s."""
    for _ in range(1500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not true within 15 s")


def awaits_in(task: asyncio.Task[Any], function: str) -> bool:
    """Whether ``task`` is suspended somewhere inside ``function``."""
    coro: Any = task.get_coro()
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and code.co_name == function:
            return True
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return False


async def test_an_aborted_upload_is_one_debug_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that goes away mid-body is its own business: no ERROR, no traceback."""
    runtime, _ = config_dir_env(tmp_path)
    with caplog.at_level(logging.DEBUG):
        async with App(Settings.from_env(base_env(**runtime))) as app:
            assert app.http is not None
            _, writer = await asyncio.open_connection("127.0.0.1", app.http.port)
            writer.write(b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"domain\":")
            await writer.drain()
            # Until the handler waits for the rest of the body; then the client goes away.
            await eventually(lambda: any(awaits_in(t, "json_endpoint") for t in asyncio.all_tasks()))
            writer.transport.abort()
            await eventually(lambda: any("connection lost" in r.getMessage() for r in caplog.records))
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert [(r.levelno, r.name) for r in lost] == [(logging.DEBUG, "ratelimit_svc.servers.http_api")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_logs_the_listening_address(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime, _ = config_dir_env(tmp_path)
    with caplog.at_level(logging.WARNING):
        async with App(Settings.from_env(base_env(**runtime))) as app:
            assert app.http is not None
            address = f"127.0.0.1:{app.http.port}"
    assert app.http.port > 0
    assert f"Listening for HTTP on '{address}'" in caplog.messages
    record = next(r for r in caplog.records if r.message.startswith("Listening for HTTP"))
    assert record.levelno == logging.WARNING
