"""Fixtures for every tier, registered as plugins (no re-exports): the fake clock, the real
servers and what the process does on its sockets (tests/support). Tiers: tests/unit (no
processes, no network sockets; `make test-unit`), tests/integration (real Redis, memcached,
service processes), tests/e2e (the real Envoy)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "support.clock",
    "support.redis_fixtures",
    "support.cluster_fixtures",
    "support.memcache_fixtures",
    "support.socket_watch",
]

TIERS = ("unit", "integration", "e2e", "differential")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier (its folder), so `-m unit` selects a tier too."""
    root = Path(__file__).parent
    for item in items:
        parts = Path(item.fspath).relative_to(root).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
