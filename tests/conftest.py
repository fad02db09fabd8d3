"""Shared fixtures: a fake clock here; real servers come from the fixture modules imported below."""

from __future__ import annotations

import pytest
from cluster_fixtures import (  # noqa: F401
    redis_cluster,
    redis_cluster_factory,
    redis_sentinel,
    redis_sentinel_factory,
)
from memcache_fixtures import memcached_factory, memcached_server  # noqa: F401
from redis_fixtures import (  # noqa: F401
    redis_db,
    redis_server,
    redis_server_factory,
    redis_url,
    socket_writes,
)


class FakeClock:
    """Unix time that only moves when a test says so."""

    def __init__(self, now: float = 1700000005.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
