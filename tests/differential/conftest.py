"""Fixtures of the differential tier: the reference binary (or a skip saying why) and one pair
of Redis servers for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.redis_fixtures import RedisServer

from .compare import load_allow_list
from .processes import find_reference, redis_pair


@pytest.fixture(scope="session")
def reference_binary() -> str:
    binary, why = find_reference()
    if binary is None:
        pytest.skip(f"differential tier skipped: {why}")
    return binary


@pytest.fixture(scope="session")
def redises() -> Iterator[tuple[RedisServer, RedisServer]]:
    with redis_pair() as pair:
        yield pair


@pytest.fixture(scope="session")
def allowed() -> dict[str, str]:
    return load_allow_list()
