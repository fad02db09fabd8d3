"""REDIS_URL and REDIS_PERSECOND_URL as ``redis://[user:password@]host[:port][/db]`` and
``rediss://`` (TLS) besides ``host:port`` (docs/backends.md, Connecting): how they are taken apart,
and errors that never show the password. A real service on such URLs: tests/integration/test_redis_url_service.py."""

from __future__ import annotations

from typing import Any

import pytest

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.settings.model import Settings

SECRET = "pa:ss@w0rd-91"  # a colon and an at sign: both must survive percent-decoding
ENCODED = "pa%3Ass%40w0rd-91"


def redis(env: dict[str, str]) -> Any:
    return Settings.from_env(env).redis


# -- taking the URL apart ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://10.0.0.1:6380", {"url": "10.0.0.1:6380", "tls": False, "db": 0, "auth": ""}),
        ("redis://cache.example", {"url": "cache.example:6379", "db": 0}),
        (f"redis://alice:{ENCODED}@h:1/3", {"url": "h:1", "auth": f"alice:{SECRET}", "db": 3}),
        (f"redis://:{ENCODED}@h:1/", {"auth": SECRET, "db": 0}),
        ("rediss://h:6380/2", {"url": "h:6380", "tls": True, "db": 2}),
        ("redis://[::1]:7000", {"url": "[::1]:7000"}),
    ],
)
def test_url_forms(url: str, expected: dict[str, Any]) -> None:
    cfg = redis({"REDIS_URL": url})
    assert cfg.socket_type == "tcp"  # a URL is TCP whatever REDIS_SOCKET_TYPE says (default unix)
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name


def test_per_second_url_is_read_by_the_same_function() -> None:
    settings = Settings.from_env(
        {"REDIS_PERSECOND": "true", "REDIS_PERSECOND_URL": f"rediss://bob:{ENCODED}@h:9/1"}
    )
    cfg = settings.redis_persecond_settings
    assert (cfg.url, cfg.auth, cfg.db, cfg.tls) == ("h:9", f"bob:{SECRET}", 1, True)
    assert SECRET not in repr(settings) and ENCODED not in repr(settings)
    assert SECRET not in str(settings.redacted()) and ENCODED not in str(settings.redacted())


def test_host_port_and_a_unix_socket_are_unchanged() -> None:
    assert redis({"REDIS_URL": "h:6379", "REDIS_SOCKET_TYPE": "tcp"}).url == "h:6379"
    cfg = redis({"REDIS_URL": "/run/redis.sock"})
    assert (cfg.url, cfg.socket_type, cfg.db) == ("/run/redis.sock", "unix", 0)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"REDIS_URL": f"redis://u:{ENCODED}@h:port"}, "Port could not be cast"),
        ({"REDIS_URL": f"redis://u:{ENCODED}@h:99999"}, "out of range"),
        ({"REDIS_URL": "redis://alice@h:1"}, "a user name without a password"),
        ({"REDIS_URL": f"redis://u:{ENCODED}@h:1/zero"}, "the database must be a number"),
        ({"REDIS_URL": f"redis://u:{ENCODED}@h:1/0?ssl=1"}, "query parameters"),
        ({"REDIS_URL": f"redis://u:{ENCODED}@"}, "expected redis://"),
        ({"REDIS_URL": f"redis://u:{ENCODED}@h:1", "REDIS_AUTH": "x"}, "both REDIS_URL and"),
        ({"REDIS_URL": f"redis://u:{ENCODED}@h:1", "REDIS_TYPE": "cluster"}, "REDIS_TYPE=single"),
        ({"REDIS_URL": f"redis://u:{ENCODED}@h:1/2", "REDIS_DB": "3"}, "database 2 in REDIS_URL"),
    ],
)
def test_bad_urls_are_named_without_the_password(env: dict[str, str], reason: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_URL") as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert reason in message
    assert ENCODED not in message and SECRET not in message
