"""A real service on ``redis://`` and ``rediss://`` URLs (docs/backends.md, Connecting): an ACL
user, a database and TLS from the URL, and neither logs nor debug pages ever show the password."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.redis_fixtures import HOST, RedisServer
from support.service_env import base_env, config_dir_env

from ratelimit_svc.app import App
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.settings.model import Settings

SECRET = "pa:ss@w0rd-91"
ENCODED = "pa%3Ass%40w0rd-91"  # SECRET percent-encoded, as it appears in the URL

# -- a real service ------------------------------------------------------------------------------


DEBUG_PAGES = ("/", "/settings", "/stats", "/rlconfig", "/debug/tasks", "/debug/threads")


async def test_user_password_and_database_from_the_url_never_shown(
    tmp_path: Path, redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server: RedisServer = redis_server_factory(
        requirepass="admin-pw", users=[f"alice on >{SECRET} ~* +@all"]
    )
    caplog.set_level(logging.DEBUG)
    runtime, _ = config_dir_env(tmp_path)
    url = f"redis://alice:{ENCODED}@{server.url}/3"
    # DEBUG_PROFILING_ENABLED: the profiling pages must not show the password either.
    env = base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_URL=url, LOG_LEVEL="DEBUG",
        DEBUG_PROFILING_ENABLED="true",
    )  # fmt: skip
    pages: list[str] = []
    async with App(Settings.from_env(env)) as app:
        assert app.service is not None and app.debug is not None
        request = Request("basic", (RequestDescriptor((("key1", "x"),)),))
        decision = await app.service.should_rate_limit(request)
        assert decision.statuses[0].remaining == 1
        async with aiohttp.ClientSession(f"http://{HOST}:{app.debug.port}") as debug:
            for page in DEBUG_PAGES:
                async with debug.get(page) as response:
                    assert response.status == 200, page
                    pages.append(await response.text())
    with server.client() as admin:
        admin.select(3)
        assert len(admin.keys("basic_key1_x_*")) == 1  # counted in database 3, as alice
        admin.select(0)
        assert admin.keys("*") == []
    for text in (*pages, caplog.text, *(str(r.args) for r in caplog.records)):
        assert SECRET not in text and ENCODED not in text


async def test_wrong_password_in_the_url_fails_without_showing_it(
    tmp_path: Path, redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server: RedisServer = redis_server_factory(requirepass="right-pw")
    caplog.set_level(logging.DEBUG)
    runtime, _ = config_dir_env(tmp_path)
    env = base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_URL=f"redis://:{ENCODED}@{server.url}",
        REDIS_STARTUP_INITIAL_INTERVAL="10ms", REDIS_STARTUP_MAX_ELAPSED_TIME="100ms",
    )  # fmt: skip
    with pytest.raises(BackendError, match=r"WRONGPASS|invalid password") as caught:
        async with App(Settings.from_env(env)):
            pass
    for text in (str(caught.value), caplog.text):
        assert SECRET not in text and ENCODED not in text
    assert server.url in str(caught.value)


async def test_rediss_url_connects_over_tls(tmp_path: Path, redis_server_factory: Any) -> None:
    server: RedisServer = redis_server_factory(tls=True)
    assert server.tls_files is not None
    runtime, _ = config_dir_env(tmp_path)
    env = base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_URL=f"rediss://{server.url}",
        REDIS_TLS_CACERT=str(server.tls_files.ca),
    )  # fmt: skip
    async with App(Settings.from_env(env)) as app:
        assert app.service is not None
        request = Request("basic", (RequestDescriptor((("key1", "tls"),)),))
        assert (await app.service.should_rate_limit(request)).statuses[0].remaining == 1
    with server.client() as admin:
        assert len(admin.keys("basic_key1_tls_*")) == 1
